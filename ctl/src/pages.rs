//! The list calls that come in pages: `ls` follows `next_page_token` until
//! the last page, so that it shows everything whatever page size the daemon
//! picks.

use std::future::Future;

/// Every item of a paginated list. `fetch` asks for the page after a token
/// (empty: the first page) and answers its items and the next token
/// (empty: the last page). `what` names the list in an error.
pub(crate) async fn all<T, F>(what: &str, mut fetch: impl FnMut(String) -> F) -> anyhow::Result<Vec<T>>
where
    F: Future<Output = Result<(Vec<T>, String), tonic::Status>>,
{
    let mut items = Vec::new();
    let mut page_token = String::new();
    loop {
        let (page, next_page_token) = fetch(page_token.clone()).await?;
        items.extend(page);
        if next_page_token.is_empty() {
            return Ok(items);
        }
        // A daemon that hands back the token it was given would keep us
        // looping forever; stop with a message instead.
        if next_page_token == page_token {
            anyhow::bail!("the daemon repeated page token {page_token:?} while listing {what}");
        }
        page_token = next_page_token;
    }
}
