//! `WatchStats` subscribers that never read cost the daemon a bounded
//! amount of memory: each one holds at most the latest figures (not a queue
//! of them), there are at most so many of them, and a slow one is told how
//! many updates it missed.

use std::{
    net::TcpStream,
    time::{Duration, Instant},
};

use asyncore_proto::v1::{self, channels_client::ChannelsClient};
use asyncore_tests::{Daemon, InProcessDaemon, connect, eventually, patience, within};
use tokio_stream::StreamExt;
use tonic::{Code, transport::Endpoint};

use crate::runtime;

/// Channels the watchers watch: each update carries one entry per channel.
const N_CHANNELS: usize = 3000;
/// The daemon's default cap on concurrent watchers.
const MAX_WATCHERS: usize = 64;

/// A `WatchStats` stream on a connection of its own whose HTTP/2 windows
/// are `window` bytes, so that, not reading, it soon stops taking data:
/// what it is sent then waits in the daemon.
async fn stalled_watcher(
    control: std::net::SocketAddr,
    interval_ms: u32,
    window: u32,
) -> tonic::Streaming<v1::StatsUpdate> {
    let channel = Endpoint::from_shared(format!("http://{control}"))
        .unwrap()
        .initial_stream_window_size(window)
        .initial_connection_window_size(window)
        .connect_timeout(patience())
        .connect()
        .await
        .expect("connect to the control api");
    let request = v1::WatchStatsRequest { interval_ms, listener_id: None, channel_ids: vec![], changed_only: false };
    ChannelsClient::new(channel).watch_stats(request).await.expect("WatchStats").into_inner()
}

/// The highest resident memory of the daemon sampled every 50 ms over
/// `window` (many ticks of the watchers' interval).
async fn peak_rss_kib(daemon: &Daemon, window: Duration) -> u64 {
    let mut peak = daemon.rss_kib();
    let samples = (window.as_millis() / 50) as u32;
    for _ in 0..samples {
        tokio::time::sleep(Duration::from_millis(50)).await;
        peak = peak.max(daemon.rss_kib());
    }
    peak
}

#[test]
fn watchers_that_never_read_cost_bounded_memory_and_are_capped() {
    let daemon = Daemon::start();
    runtime().block_on(async {
        let mut client = daemon.client().await;
        let (_, address) = client.start_listener("echo", &[]).await;
        let peers: Vec<TcpStream> = (0..N_CHANNELS).map(|_| connect(address)).collect();
        eventually!(
            async || {
                let stats = client.daemon.get_loop_stats(v1::GetLoopStatsRequest {}).await.unwrap().into_inner();
                stats.channels as usize > N_CHANNELS
            },
            "{N_CHANNELS} accepted channels"
        )
        .await;
        // One watcher that reads, to settle what a first watch allocates.
        let mut reader = stalled_watcher(daemon.control(), 10, 65_535).await;
        within("a stats update", reader.next()).await.unwrap().unwrap();
        drop(reader);
        let before = daemon.rss_kib();

        let mut watchers = Vec::new();
        for _ in 0..MAX_WATCHERS {
            watchers.push(stalled_watcher(daemon.control(), 10, 65_535).await);
        }
        // 200 ticks of 10 ms: each tick is an update of N_CHANNELS entries
        // for every watcher.
        let peak = peak_rss_kib(&daemon, Duration::from_secs(2)).await;

        // One more is refused, clearly.
        let channel = Endpoint::from_shared(format!("http://{}", daemon.control())).unwrap().connect().await.unwrap();
        let request = v1::WatchStatsRequest { interval_ms: 10, listener_id: None, channel_ids: vec![], changed_only: false };
        let refused = ChannelsClient::new(channel).watch_stats(request).await;
        let growth = peak.saturating_sub(before);
        println!(
            "{MAX_WATCHERS} watchers that never read, {N_CHANNELS} channels, 10 ms: rss {before} KiB -> peak {peak} KiB \
             (+{growth} KiB, {} KiB per watcher)",
            growth / MAX_WATCHERS as u64
        );
        let refused = refused.expect_err("a watcher past the cap");
        assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
        assert!(refused.message().contains(&MAX_WATCHERS.to_string()), "{refused:?}");

        drop(watchers);
        let after = peak_rss_kib(&daemon, Duration::from_millis(500)).await;
        println!("after the watchers left: rss {after} KiB");
        // Each update is about 250 KiB of figures here; a queue of them per
        // watcher cost over 2 MiB each.
        assert!(growth < 48 * 1024, "{MAX_WATCHERS} stalled watchers grew the daemon by {growth} KiB");
        drop(peers);
    });
}

#[test]
fn a_slow_watcher_gets_the_latest_figures_and_the_count_it_missed() {
    runtime().block_on(async {
        let daemon = InProcessDaemon::start().await;
        let mut client = daemon.client().await;
        let (listener_id, address) = client.start_listener("echo", &[]).await;
        let mut peers: Vec<TcpStream> = (0..50).map(|_| connect(address)).collect();
        let closing = peers.pop().unwrap();
        let closing_peer = closing.local_addr().unwrap();
        let closing_id = client.channel_by_peer(listener_id, closing_peer).await.id;
        eventually!(async || client.channels_of(listener_id).await.len() == 51, "50 accepted channels").await;

        // Each update is about 400 bytes: the window holds a few.
        let mut stream = stalled_watcher(daemon.control(), 10, 2048).await;
        let first = within("a stats update", stream.next()).await.unwrap().unwrap();
        assert_eq!((first.seq, first.missed_updates), (1, 0));
        // Not reading for a while (the window fills in a few ticks): a
        // close happens meanwhile, in a tick this stream skips.
        tokio::time::sleep(Duration::from_millis(250)).await;
        drop(closing);
        tokio::time::sleep(Duration::from_millis(250)).await;

        let mut closed_reports = 0;
        let mut seen_missed = 0;
        let mut previous_seq = first.seq;
        let mut messages = 0;
        // Reading as fast as it comes: first what the small windows held,
        // then the latest figures with the count of those skipped, then
        // each update as it is taken.
        within("a message saying updates were missed, the close reported, and the stream caught up", async {
            loop {
                let update = stream.next().await.unwrap().unwrap();
                assert_eq!(update.seq, previous_seq + 1, "seq counts the messages of the stream");
                previous_seq = update.seq;
                messages += 1;
                seen_missed += update.missed_updates;
                let closed_here = update.channels.iter().filter(|c| c.channel_id == closing_id && c.closed).count();
                if closed_here > 0 {
                    assert!(update.missed_updates > 0, "the close is reported with the skipped updates: {update:?}");
                }
                closed_reports += closed_here;
                let live = update.channels.iter().filter(|c| !c.closed).count();
                assert!(live <= 50, "the live channels once each: {update:?}");
                if seen_missed > 0 && closed_reports > 0 && update.missed_updates == 0 {
                    break;
                }
            }
        })
        .await;
        println!("after a 500 ms pause at 10 ms: {messages} messages read, {seen_missed} updates missed");
        assert_eq!(closed_reports, 1, "the closed channel is reported once");
        // Later messages do not repeat it.
        for _ in 0..3 {
            let update = within("a stats update", stream.next()).await.unwrap().unwrap();
            assert!(update.channels.iter().all(|c| c.channel_id != closing_id), "{update:?}");
        }
        drop(peers);
    });
}

/// Idle channels the cheap watchers watch.
const IDLE_CHANNELS: usize = 5000;
/// Watchers, as in the hardening issue's target.
const CHEAP_WATCHERS: usize = 10;

/// A `WatchStats` stream of every channel at 100 ms.
async fn watcher(control: std::net::SocketAddr, changed_only: bool) -> tonic::Streaming<v1::StatsUpdate> {
    let channel = Endpoint::from_shared(format!("http://{control}")).unwrap().connect().await.unwrap();
    let request = v1::WatchStatsRequest { interval_ms: 100, listener_id: None, channel_ids: vec![], changed_only };
    ChannelsClient::new(channel).watch_stats(request).await.expect("WatchStats").into_inner()
}

/// Reads `stream` until it is dropped, keeping the channel counts of its
/// messages.
fn keep_reading(mut stream: tonic::Streaming<v1::StatsUpdate>) -> tokio::task::JoinHandle<Vec<usize>> {
    tokio::spawn(async move {
        let mut sizes = Vec::new();
        while let Ok(Some(update)) = stream.message().await {
            sizes.push(update.channels.len());
            if sizes.len() >= 40 {
                break;
            }
        }
        sizes
    })
}

/// Ten watchers over thousands of idle channels, at 100 ms, cost the
/// daemon next to nothing when they ask for what changed: the loop is asked
/// for the channels that changed since the previous tick, and the messages
/// carry only those. (Before, each tick snapshotted every channel on the
/// loop and sent each one to every watcher: 10 x 5,000 records ten times a
/// second.) Measured as the daemon's CPU time over the watch, against the
/// wall time.
#[test]
fn watchers_of_what_changed_cost_what_changed() {
    let daemon = Daemon::start();
    runtime().block_on(async {
        let mut client = daemon.client().await;
        let (_, address) = client.start_listener("echo", &[]).await;
        let mut peers: Vec<TcpStream> = (0..IDLE_CHANNELS).map(|_| connect(address)).collect();
        eventually!(
            async || {
                let stats = client.daemon.get_loop_stats(v1::GetLoopStatsRequest {}).await.unwrap().into_inner();
                stats.channels as usize > IDLE_CHANNELS
            },
            "{IDLE_CHANNELS} accepted channels"
        )
        .await;

        let mut streams = Vec::new();
        for _ in 0..CHEAP_WATCHERS {
            streams.push(watcher(daemon.control(), true).await);
        }
        // The first message lists every channel, complete.
        for stream in &mut streams {
            let first = within("a first stats update", stream.next()).await.unwrap().unwrap();
            assert!(first.complete);
            assert_eq!(first.channels.len(), IDLE_CHANNELS);
        }
        // One channel talks: the next messages name it, and nothing else.
        use std::io::{Read as _, Write as _};
        let talker = &mut peers[7];
        talker.write_all(b"ping").unwrap();
        let mut echoed = [0u8; 4];
        talker.read_exact(&mut echoed).unwrap();
        let stream = &mut streams[0];
        let named = eventually!(
            async || {
                let update = within("a stats update", stream.next()).await.unwrap().unwrap();
                (!update.channels.is_empty()).then_some(update)
            },
            "an update naming the channel that talked"
        )
        .await;
        assert!(!named.complete);
        assert_eq!(named.channels.len(), 1, "{named:?}");
        assert_eq!((named.channels[0].bytes_in, named.channels[0].bytes_out), (4, 4));

        let readers: Vec<_> = streams.into_iter().map(keep_reading).collect();
        let (cpu_before, loop_before, wall) = (daemon.cpu_time(), daemon.thread_cpu_time("poll-loop"), Instant::now());
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (cpu, on_loop) = (daemon.cpu_time() - cpu_before, daemon.thread_cpu_time("poll-loop") - loop_before);
        let wall = wall.elapsed();
        for reader in readers {
            let sizes = within("a watcher's messages", reader).await.unwrap();
            assert!(sizes.len() >= 10, "a watcher got {} messages in 3 s at 100 ms", sizes.len());
            // The watchers that had not read since the ping see the talker
            // once (after what was already on its way), then nothing.
            assert!(sizes.iter().sum::<usize>() <= 1, "idle channels were sent again: {sizes:?}");
        }
        let share = cpu.as_secs_f64() / wall.as_secs_f64();
        println!(
            "{CHEAP_WATCHERS} changed-only watchers at 100 ms over {IDLE_CHANNELS} idle channels: \
             daemon CPU {cpu:?} ({:.1}% of {wall:?}), poll loop {on_loop:?}",
            share * 100.0
        );
        assert!(share < 0.05, "the watchers cost the daemon {:.1}% of a core", share * 100.0);
        drop(peers);
    });
}
