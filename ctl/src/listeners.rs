//! `asyncorectl listeners`: list, start and stop the daemon's listening
//! sockets.

use std::collections::HashMap;

use asyncore_proto::v1;
use asyncore_proto::v1::listeners_client::ListenersClient;
use serde_json::{Value, json};
use tonic::transport::Channel;

use crate::flags::{ListenersCommand, OutputFormat};
use crate::render::{listener_json, listeners_table, print_json, print_text};

pub(crate) async fn run(channel: Channel, command: ListenersCommand, format: OutputFormat) -> anyhow::Result<()> {
    let mut client = ListenersClient::new(channel);
    let listeners = match command {
        ListenersCommand::Ls => {
            let listeners = list_all_listeners(&mut client).await?;
            if format == OutputFormat::Json {
                let items: Vec<Value> = listeners.iter().map(listener_json).collect();
                return print_json(&json!({ "listeners": items }));
            }
            listeners
        }
        ListenersCommand::Start { address, plugin, config } => {
            let request =
                v1::StartListenerRequest { address, plugin, config: config.into_iter().collect::<HashMap<_, _>>() };
            vec![client.start_listener(request).await?.into_inner()]
        }
        ListenersCommand::Stop { id, close_channels } => {
            let request = v1::StopListenerRequest { id, close_channels };
            vec![client.stop_listener(request).await?.into_inner()]
        }
    };
    match format {
        // Only `ls` answers with a list; start and stop answer with the one
        // listener they changed, printed as an object.
        OutputFormat::Json => print_json(&listener_json(&listeners[0])),
        OutputFormat::Table => print_text(&listeners_table(&listeners)),
    }
}

/// Follows `next_page_token` until the last page, so that `ls` shows every
/// listener whatever page size the daemon picks.
async fn list_all_listeners(client: &mut ListenersClient<Channel>) -> anyhow::Result<Vec<v1::Listener>> {
    let mut listeners = Vec::new();
    let mut page_token = String::new();
    loop {
        // Zero lets the daemon use its default page size.
        let request = v1::ListListenersRequest { page_size: 0, page_token };
        let page = client.list_listeners(request).await?.into_inner();
        listeners.extend(page.listeners);
        if page.next_page_token.is_empty() {
            return Ok(listeners);
        }
        page_token = page.next_page_token;
    }
}
