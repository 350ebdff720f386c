//! `GET /`: a read-only status page for people, with a browser: the
//! daemon's phase and loop health, the listeners, the plugins with their
//! generations, and the busiest channels with live rates.
//!
//! It is one static document, `status_page.html`, compiled in: plain HTML
//! and a small inline script that reads this port's own `/v1` API
//! (`/v1/daemon`, `/v1/listeners` and `/v1/plugins` every two seconds, the
//! rates from the `/v1/stats/watch` event stream, a channel's peer from
//! `/v1/channels/{id}`). Nothing else is fetched, and the content security
//! policy says so to the browser: no framework, no CDN, no other origin.
//!
//! The document itself holds no data and needs no token; with a token file
//! its script sends the one it is given (`/#token=SECRET`, or a form shown
//! when the API answers 401), kept in the tab's session storage.

use axum::{
    http::{HeaderValue, header},
    response::{IntoResponse, Response},
};

/// The page.
const PAGE: &str = include_str!("status_page.html");

/// What the page may load and run: its own inline script and style, and
/// requests to this origin; nothing else, and no framing.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                                       connect-src 'self'; base-uri 'none'; form-action 'none'; \
                                       frame-ancestors 'none'";

/// Serves the page (`HEAD` too: axum answers it from `GET`).
pub(super) async fn serve() -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8")),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY)),
            (header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
            (header::REFERRER_POLICY, HeaderValue::from_static("no-referrer")),
        ],
        PAGE,
    )
        .into_response()
}
