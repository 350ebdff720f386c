//! `asyncorectl config reload`: the daemon re-reads its config file.

use asyncore_proto::v1;
use asyncore_proto::v1::daemon_client::DaemonClient;
use serde_json::json;

use crate::connection::Channel;
use crate::flags::{ConfigCommand, OutputFormat};
use crate::render::{listener_json, listeners_table, print_json, print_text};

pub(crate) async fn run(channel: Channel, command: ConfigCommand, format: OutputFormat) -> anyhow::Result<()> {
    match command {
        ConfigCommand::Reload => {
            let outcome = DaemonClient::new(channel).reload_config(v1::ReloadConfigRequest {}).await?.into_inner();
            match format {
                OutputFormat::Json => print_json(&json!({
                    "path": outcome.path,
                    "started": outcome.started.iter().map(listener_json).collect::<Vec<_>>(),
                    "stopped": outcome.stopped.iter().map(listener_json).collect::<Vec<_>>(),
                    "unchanged": outcome.unchanged,
                    "restart_needed": outcome.restart_needed,
                    "reread": outcome.reread,
                })),
                OutputFormat::Table => print_text(&reload_text(&outcome)),
            }
        }
    }
}

fn reload_text(outcome: &v1::ReloadConfigResponse) -> String {
    let mut text = format!(
        "reloaded {}: {} listeners started, {} stopped, {} unchanged\n",
        outcome.path,
        outcome.started.len(),
        outcome.stopped.len(),
        outcome.unchanged
    );
    if !outcome.restart_needed.is_empty() {
        text.push_str(&format!(
            "changed, and in force at the next start only: {}\n",
            outcome.restart_needed.join(", ")
        ));
    }
    if !outcome.reread.is_empty() {
        text.push_str(&format!("read again and in force: {}\n", outcome.reread.join(", ")));
    }
    for (what, listeners) in [("started", &outcome.started), ("stopped", &outcome.stopped)] {
        if !listeners.is_empty() {
            text.push_str(&format!("\n{what}:\n{}", listeners_table(listeners)));
        }
    }
    text
}
