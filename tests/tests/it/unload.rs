//! Unloading: a plugin's library is closed (`dlclose`) once nothing can call
//! it again, so reloads do not pile up images. Measured through the daemon
//! binary (its memory and `/proc/PID/maps`) and, for the loader alone, in
//! this process.

use asyncore_engine::plugin_host::{self, Unloaded};
use asyncore_proto::v1;
use asyncore_tests::{Client, Daemon, eventually, plugin_library, within};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::runtime;

/// The private copies (`asyncored-PID/...`) mapped in process `pid`, each
/// once.
fn mapped_copies(pid: u32) -> Vec<String> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mut copies: Vec<String> = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .filter(|path| path.contains("/asyncored-"))
        .map(str::to_string)
        .collect();
    copies.sort();
    copies.dedup();
    copies
}

fn maps_lines(pid: u32) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap().lines().count()
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).unwrap().trim().trim_end_matches("kB").trim().parse().unwrap()
}

#[test]
fn a_loaded_plugin_never_handed_to_an_engine_unloads_and_leaves_no_map() {
    let echo = plugin_library("asyncore_plugin_echo");
    let pid = std::process::id();
    let echo_copies = || mapped_copies(pid).into_iter().filter(|p| p.contains("libasyncore_plugin_echo")).count();
    let before = echo_copies();
    for _ in 0..50 {
        let plugin = plugin_host::load(&echo).unwrap();
        assert_eq!(plugin.unload(), Unloaded::Unmapped);
    }
    // Other tests of this process may load echo meanwhile, a few at most.
    let after = echo_copies();
    assert!(after < before + 10, "50 loads and unloads: {before} mapped copies of echo before, {after} after");
}

/// One reload of echo, a round trip on the new generation, and the
/// previous generation retired (or, without `retire`, left to the daemon).
async fn cycle(client: &mut Client, address: std::net::SocketAddr, generation: u32, retire: bool) {
    let plugin = client
        .plugins
        .reload_plugin(v1::ReloadPluginRequest { name: "echo".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(plugin.current_generation, generation);
    let mut stream = within("a connection", TcpStream::connect(address)).await.unwrap();
    stream.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    within("an echo", stream.read_exact(&mut back)).await.unwrap();
    drop(stream);
    if !retire {
        return;
    }
    // Forced: the connection just closed may not have left yet; its
    // channel is closed gracefully and the library goes after it.
    client
        .plugins
        .unload_plugin(v1::UnloadPluginRequest { name: "echo".into(), generation: Some(generation - 1), force: true })
        .await
        .unwrap();
}

#[test]
fn two_hundred_reloads_with_their_old_generations_retired_leave_no_image_behind() {
    reloads_leave_no_image_behind(true, 1);
}

#[test]
fn two_hundred_plain_reloads_keep_a_few_standbys_and_no_more() {
    // Without unloading: the daemon retires idle generations past the
    // newest four kept for a rollback.
    reloads_leave_no_image_behind(false, 5);
}

/// 200 reloads (each with a round trip, and the previous generation
/// retired when `retire`); then at most `mapped` copies of echo stay
/// mapped, and memory and maps stay flat.
fn reloads_leave_no_image_behind(retire: bool, mapped: usize) {
    let daemon = Daemon::start();
    let pid = daemon.pid();
    runtime().block_on(async {
        let mut client = daemon.client().await;
        let (_, address) = client.start_listener("echo", &[]).await;
        // Warm up: the allocator, the gRPC connection, the loader thread.
        let mut generation = 1;
        for _ in 0..10 {
            generation += 1;
            cycle(&mut client, address, generation, retire).await;
        }
        eventually!(
            async || mapped_copies(pid).len() <= mapped,
            "at most {mapped} generations mapped: {:?}",
            mapped_copies(pid)
        )
        .await;
        let (rss_before, maps_before) = (rss_kib(pid), maps_lines(pid));

        let reloads: u32 = 200;
        for _ in 0..reloads {
            generation += 1;
            cycle(&mut client, address, generation, retire).await;
        }
        eventually!(
            async || mapped_copies(pid).len() <= mapped,
            "at most {mapped} generations mapped: {:?}",
            mapped_copies(pid)
        )
        .await;
        let (rss_after, maps_after) = (rss_kib(pid), maps_lines(pid));
        eprintln!(
            "{reloads} reloads: RSS {rss_before} -> {rss_after} KiB ({:.1} KiB a reload), maps {maps_before} -> {maps_after}",
            (rss_after as f64 - rss_before as f64) / f64::from(reloads)
        );
        // Kept, each retired image cost 4 maps and about 400 KiB (debug
        // build); closed, 200 reloads cost 4 maps and 2.2 KiB a reload.
        assert!(maps_after < maps_before + 20, "maps: {maps_before} before, {maps_after} after {reloads} reloads");
        assert!(
            rss_after < rss_before + u64::from(reloads) * 16,
            "resident memory: {rss_before} KiB before, {rss_after} KiB after {reloads} reloads"
        );
    });
}
