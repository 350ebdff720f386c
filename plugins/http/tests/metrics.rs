//! Responses by status, as plugin metrics the daemon exports. A test binary
//! of its own: a process's in-process plugins of one name share their
//! metrics.

use std::io::{Read, Write};

use asyncore_plugin_http::Http;
use asyncore_sdk::Config;
use asyncore_testing::{MetricKind, TestServer, eventually};

#[test]
fn responses_are_counted_by_status() {
    let root = std::env::temp_dir().join(format!("asyncore-http-metrics-{}", std::process::id()));
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("a.txt"), b"a\n").unwrap();
    let server = TestServer::start::<Http>(Config::from_pairs([("root", root.to_str().unwrap())])).unwrap();
    let mut client = server.connect();
    client
        .write_all(
            b"GET /static/a.txt HTTP/1.1\r\nHost: t\r\n\r\n\
              GET /static/a.txt HTTP/1.1\r\nHost: t\r\n\r\n\
              GET /static/nope HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        )
        .unwrap();
    let mut all = Vec::new();
    client.read_to_end(&mut all).unwrap();
    // The last response ended the connection; its count is in.
    eventually("the responses to be counted", || server.metric("http_responses_404_total") == Some(1));
    assert_eq!(server.metric("http_responses_200_total"), Some(2));
    let metric = server.metrics().into_iter().find(|m| m.name == "http_responses_200_total").unwrap();
    assert_eq!(metric.kind, MetricKind::Counter);
    let _ = std::fs::remove_dir_all(&root);
}
