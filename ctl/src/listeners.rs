//! `asyncorectl listeners`: list, start, stop (at once or draining),
//! suspend, resume and limit the daemon's listening sockets.

use std::{collections::HashMap, time::Duration};

use asyncore_proto::v1;
use asyncore_proto::v1::listeners_client::ListenersClient;
use serde_json::{Value, json};

use crate::connection::{self, Channel, ControlTarget};
use crate::flags::{ListenersCommand, OutputFormat};
use crate::pages;
use crate::render::{listener_json, listeners_table, print_json, print_text};

/// How long a draining stop may take beyond its drain timeout: the
/// channels left are then closed gracefully, which the daemon bounds by its
/// close timeout (its `drain_timeout_secs`, 30 s by default) plus a 2 s
/// linger.
const DRAIN_GRACE: Duration = Duration::from_secs(40);

pub(crate) async fn run(
    channel: Channel,
    command: ListenersCommand,
    format: OutputFormat,
    target: &ControlTarget,
) -> anyhow::Result<()> {
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
        ListenersCommand::Stop { id, close_channels, drain_timeout: None } => {
            let request = v1::StopListenerRequest { id, close_channels, drain_timeout_ms: None };
            vec![client.stop_listener(request).await?.into_inner()]
        }
        ListenersCommand::Stop { id, drain_timeout: Some(drain_timeout_ms), .. } => {
            // The answer comes once the channels are gone: wait for it
            // longer than for other calls.
            let waited = target.timeout() + Duration::from_millis(drain_timeout_ms) + DRAIN_GRACE;
            let channel = connection::connect(&target.clone().with_timeout(waited)).await?;
            let request = v1::DrainListenerRequest { id, drain_timeout_ms };
            vec![ListenersClient::new(channel).drain_listener(request).await?.into_inner()]
        }
        ListenersCommand::Suspend { id } => {
            vec![client.suspend_listener(v1::SuspendListenerRequest { id }).await?.into_inner()]
        }
        ListenersCommand::Resume { id } => {
            vec![client.resume_listener(v1::ResumeListenerRequest { id }).await?.into_inner()]
        }
        ListenersCommand::Limit { id: Some(id), max_connections, .. } => {
            let request = v1::SetListenerLimitsRequest { id, max_connections };
            vec![client.set_listener_limits(request).await?.into_inner()]
        }
        ListenersCommand::Limit { id: None, max_connections, .. } => {
            let request = v1::SetDaemonLimitsRequest { max_connections: Some(max_connections) };
            let limits = client.set_daemon_limits(request).await?.into_inner();
            return match format {
                OutputFormat::Json => print_json(&json!({
                    "max_connections": limits.max_connections,
                    "connections": limits.connections,
                })),
                OutputFormat::Table => print_text(&format!(
                    "max_connections {} (all listeners), {} open\n",
                    if limits.max_connections == 0 { "none".to_owned() } else { limits.max_connections.to_string() },
                    limits.connections
                )),
            };
        }
    };
    match format {
        // Only `ls` answers with a list; the other verbs answer with the one
        // listener they changed, printed as an object.
        OutputFormat::Json => print_json(&listener_json(&listeners[0])),
        OutputFormat::Table => print_text(&listeners_table(&listeners)),
    }
}

/// Every listener the daemon lists, in id order.
async fn list_all_listeners(client: &mut ListenersClient<Channel>) -> anyhow::Result<Vec<v1::Listener>> {
    pages::all("listeners", |page_token| {
        let mut client = client.clone();
        // Zero lets the daemon use its default page size.
        let request = v1::ListListenersRequest { page_size: 0, page_token };
        async move {
            let page = client.list_listeners(request).await?.into_inner();
            Ok((page.listeners, page.next_page_token))
        }
    })
    .await
}
