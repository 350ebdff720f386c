//! `asyncorectl stats`, `loop-stats` and `info`: the daemon's counters,
//! streamed per channel or read once for the poll loop and the daemon.

use anyhow::Context as _;
use asyncore_proto::v1;
use asyncore_proto::v1::channels_client::ChannelsClient;
use asyncore_proto::v1::daemon_client::DaemonClient;

use crate::connection::Channel;
use crate::flags::{OutputFormat, StatsArgs};
use crate::render::{
    daemon_info_json, daemon_info_table, loop_stats_json, loop_stats_table, print_json, print_json_line, print_text,
    stats_update_block, stats_update_json,
};

/// `stats`: prints each update as it arrives, until Ctrl-C or the end of
/// the stream.
pub(crate) async fn watch(channel: Channel, args: StatsArgs, format: OutputFormat) -> anyhow::Result<()> {
    let request = v1::WatchStatsRequest {
        interval_ms: args.interval,
        listener_id: args.listener,
        channel_ids: args.channels,
        changed_only: args.changed_only,
    };
    let mut stream = ChannelsClient::new(channel).watch_stats(request).await?.into_inner();

    // Ctrl-C is the normal way to stop watching, so it ends with success
    // rather than the default signal death.
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            signal = &mut ctrl_c => {
                signal.context("cannot listen for Ctrl-C")?;
                return Ok(());
            }
            message = stream.message() => {
                let Some(update) = message? else {
                    return Ok(());
                };
                match format {
                    OutputFormat::Json => print_json_line(&stats_update_json(&update))?,
                    OutputFormat::Table => print_text(&stats_update_block(&update))?,
                }
            }
        }
    }
}

/// `loop-stats`.
pub(crate) async fn loop_stats(channel: Channel, format: OutputFormat) -> anyhow::Result<()> {
    let stats = DaemonClient::new(channel).get_loop_stats(v1::GetLoopStatsRequest {}).await?.into_inner();
    match format {
        OutputFormat::Json => print_json(&loop_stats_json(&stats)),
        OutputFormat::Table => print_text(&loop_stats_table(&stats)),
    }
}

/// `info`.
pub(crate) async fn info(channel: Channel, format: OutputFormat) -> anyhow::Result<()> {
    let info = DaemonClient::new(channel).get_daemon_info(v1::GetDaemonInfoRequest {}).await?.into_inner();
    match format {
        OutputFormat::Json => print_json(&daemon_info_json(&info)),
        OutputFormat::Table => print_text(&daemon_info_table(&info)),
    }
}
