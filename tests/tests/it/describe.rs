//! What a dispatcher says of itself (`describe`) and the metrics a plugin
//! defines reach the control plane: `GetChannel`, `asyncorectl channels
//! get`, and `ListPlugins`.

use std::io::Write;

use asyncore_proto::v1;
use asyncore_tests::{Daemon, Options, connect, eventually};

use crate::runtime;

#[test]
fn a_channel_describes_itself_and_a_plugin_shows_its_metrics() {
    let daemon = Daemon::start_with(Options { plugins: vec!["asyncore_fixture_cache"], ..Options::default() });
    let runtime = runtime();
    let mut client = runtime.block_on(daemon.client());
    let (listener_id, address) = runtime.block_on(client.start_listener("cache", &[]));
    let mut stream = connect(address);
    // A get that misses, then half a command: buffered, not framed.
    stream.write_all(b"get nothing\r\nkey").unwrap();
    let id = runtime.block_on(client.channel_by_peer(listener_id, stream.local_addr().unwrap())).id;
    let channel = runtime.block_on(eventually!(
        async || {
            let channel = client.channels.get_channel(v1::GetChannelRequest { id }).await.unwrap().into_inner();
            (channel.annotations.get("incoming_bytes").map(String::as_str) == Some("3")).then_some(channel)
        },
        "channel {id} to describe its half command"
    ));
    assert_eq!(channel.annotations.get("terminator").map(String::as_str), Some("\"\\r\\n\""), "{channel:?}");
    assert_eq!(channel.annotations.get("producers_queued").map(String::as_str), Some("0"));

    let shown = daemon.ctl(&["channels", "get", &id.to_string()]);
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.status.success(), "{text}");
    assert!(text.contains("incoming_bytes") && text.contains("terminator"), "{text}");

    let plugins =
        runtime.block_on(client.plugins.list_plugins(v1::ListPluginsRequest::default())).unwrap().into_inner();
    let cache = plugins.plugins.iter().find(|p| p.name == "cache").unwrap();
    let misses = cache.generations[0].metrics.iter().find(|m| m.name == "cache_misses_total").expect("the metric");
    assert_eq!(misses.value, 1);
    assert_eq!(misses.kind, v1::PluginMetricKind::Counter as i32);
}
