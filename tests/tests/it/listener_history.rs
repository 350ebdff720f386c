//! Stopped listeners are forgotten beyond a bounded history, and
//! `ListListeners` is paginated like `ListChannels` (the CLI follows the
//! pages).

use std::collections::HashSet;

use asyncore_proto::v1;
use asyncore_tests::{Client, Daemon, InProcessDaemon, connect, eventually};
use serde_json::Value;

use crate::runtime;

/// Every listener through all pages of `page_size`, checking that the pages
/// come in id order without repeats.
async fn all_listeners(client: &mut Client, page_size: u32) -> Vec<v1::Listener> {
    let mut listeners: Vec<v1::Listener> = Vec::new();
    let mut page_token = String::new();
    loop {
        let request = v1::ListListenersRequest { page_size, page_token };
        let page = client.listeners.list_listeners(request).await.expect("ListListeners").into_inner();
        if page_size > 0 {
            assert!(page.listeners.len() <= page_size as usize);
        }
        listeners.extend(page.listeners);
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert!(listeners.windows(2).all(|w| w[0].id < w[1].id), "in id order, each once");
    listeners
}

async fn cycle(client: &mut Client) -> u64 {
    let (id, _) = client.start_listener("echo", &[]).await;
    let stop = v1::StopListenerRequest { id, close_channels: false, drain_timeout_ms: None };
    client.listeners.stop_listener(stop).await.expect("StopListener");
    id
}

#[test]
fn stopped_listeners_are_forgotten_beyond_the_last_hundred() {
    runtime().block_on(async {
        let daemon = InProcessDaemon::start().await;
        let mut client = daemon.client().await;
        let (running, _) = client.start_listener("echo", &[]).await;
        // A stopped listener whose channel still runs is kept, however
        // many are stopped after it.
        let (busy, busy_address) = client.start_listener("echo", &[]).await;
        let peer = connect(busy_address);
        eventually!(async || client.channels_of(busy).await.len() == 2, "the busy listener's channel").await;
        client
            .listeners
            .stop_listener(v1::StopListenerRequest { id: busy, close_channels: false, drain_timeout_ms: None })
            .await
            .unwrap();

        let mut last = 0;
        for _ in 0..2000 {
            last = cycle(&mut client).await;
        }
        let listeners = all_listeners(&mut client, 0).await;
        println!("after 2000 start/stop cycles: {} listeners listed", listeners.len());
        let ids: HashSet<u64> = listeners.iter().map(|l| l.id).collect();
        assert_eq!(listeners.len(), 102, "the running one, the busy stopped one, the last 100 stopped");
        assert!(ids.contains(&running) && ids.contains(&busy) && ids.contains(&last));
        assert!(!ids.contains(&(last - 100)), "the 101st newest stopped listener is forgotten");
        let forgotten = v1::StopListenerRequest { id: last - 100, close_channels: false, drain_timeout_ms: None };
        let status = client.listeners.stop_listener(forgotten).await.expect_err("forgotten");
        assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");

        // Small pages and the default page (100) give the same listeners.
        let paged: Vec<u64> = all_listeners(&mut client, 7).await.iter().map(|l| l.id).collect();
        assert_eq!(paged, listeners.iter().map(|l| l.id).collect::<Vec<_>>());
        let first_page = client.listeners.list_listeners(v1::ListListenersRequest::default()).await.unwrap();
        let first_page = first_page.into_inner();
        assert_eq!(first_page.listeners.len(), 100);
        assert!(!first_page.next_page_token.is_empty());
        let bad = v1::ListListenersRequest { page_size: 0, page_token: "x".into() };
        let status = client.listeners.list_listeners(bad).await.expect_err("a bad token");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");

        // Once its channel is gone, the busy listener goes too (at the
        // next start or stop).
        drop(peer);
        eventually!(async || client.channels_of(busy).await.is_empty(), "the busy listener's channel to close").await;
        cycle(&mut client).await;
        let ids: HashSet<u64> = all_listeners(&mut client, 0).await.iter().map(|l| l.id).collect();
        assert!(!ids.contains(&busy), "the busy listener, idle now, is forgotten");
        assert_eq!(ids.len(), 101);
    });
}

#[test]
fn asyncorectl_lists_listeners_across_pages() {
    let daemon = Daemon::start();
    runtime().block_on(async {
        let mut client = daemon.client().await;
        for _ in 0..150 {
            client.start_listener("echo", &[]).await;
        }
    });
    let output = daemon.ctl(&["-o", "json", "listeners", "ls"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let listed: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(listed["listeners"].as_array().unwrap().len(), 150, "every page");
    let table = daemon.ctl(&["listeners", "ls"]);
    assert_eq!(String::from_utf8_lossy(&table.stdout).lines().count(), 151, "a header and 150 rows");
}
