//! Plugin libraries as they lie on disk: truncated, half written, corrupt,
//! not loadable, too large, reached through a symlink, two of one name; and
//! the private directory the daemon copies them to. Each is refused with a
//! reason (or chosen deterministically) through `LoadPlugin`, `--watch` and
//! the start-up scan, and the daemon keeps serving. The real binary
//! throughout: a library that still reached `dlopen` killed the process
//! with SIGBUS, which would take an in-process test run down with it.

use std::{
    fs::File,
    path::Path,
    time::{Duration, SystemTime},
};

use asyncore_proto::v1;
use asyncore_tests::{Client, Daemon, Options, TempDir, eventually, plugin_library, replace_file, within};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tonic::Code;

use crate::runtime;

fn echo_bytes() -> Vec<u8> {
    std::fs::read(plugin_library("asyncore_plugin_echo")).unwrap()
}

fn u16_at(bytes: &[u8], at: usize) -> usize {
    u16::from_le_bytes(bytes[at..at + 2].try_into().unwrap()) as usize
}

fn u64_at(bytes: &[u8], at: usize) -> usize {
    u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize
}

/// The program headers of a 64-bit little-endian ELF file (what the
/// workspace builds here): each one's file offset and type.
fn program_headers(bytes: &[u8]) -> Vec<(usize, u32)> {
    assert_eq!(&bytes[..6], b"\x7fELF\x02\x01", "a 64-bit little-endian ELF file");
    let (phoff, phentsize, phnum) = (u64_at(bytes, 0x20), u16_at(bytes, 0x36), u16_at(bytes, 0x38));
    (0..phnum)
        .map(|i| {
            let at = phoff + i * phentsize;
            (at, u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()))
        })
        .collect()
}

/// The echo library with every program header zeroed.
fn zeroed_program_headers() -> Vec<u8> {
    let mut bytes = echo_bytes();
    let headers = program_headers(&bytes);
    let start = headers[0].0;
    let end = headers.last().unwrap().0 + u16_at(&bytes, 0x36);
    bytes[start..end].fill(0);
    bytes
}

/// The echo library with its second loadable segment moved past the end of
/// the file (page aligned, as a real offset is).
fn load_segment_past_the_end() -> Vec<u8> {
    let mut bytes = echo_bytes();
    let (at, _) = program_headers(&bytes).into_iter().filter(|(_, kind)| *kind == 1).nth(1).expect("two PT_LOADs");
    let beyond = ((bytes.len() as u64 + 0xfff) & !0xfff) + 0x1000;
    bytes[at + 8..at + 16].copy_from_slice(&beyond.to_le_bytes());
    bytes
}

/// Broken variants of the echo library and what the refusal must say.
fn broken_libraries() -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let echo = echo_bytes();
    let cut = |percent: usize| echo[..echo.len() * percent / 100].to_vec();
    vec![
        ("trunc-4096.so", echo[..4096].to_vec(), "ends past the end of the file (4096 bytes): truncated or corrupt"),
        ("trunc-25.so", cut(25), "ends past the end of the file"),
        ("trunc-50.so", cut(50), "ends past the end of the file"),
        ("trunc-75.so", cut(75), "ends past the end of the file"),
        ("zeroed-phdrs.so", zeroed_program_headers(), "no loadable segment (PT_LOAD)"),
        ("load-past-eof.so", load_segment_past_the_end(), "(PT_LOAD) at file offset"),
        ("text.so", b"not a library\n".to_vec(), "not an ELF file"),
        ("empty.so", Vec::new(), "an empty file"),
        ("header-only.so", echo[..64].to_vec(), "the program header table at file offset 0x40"),
    ]
}

async fn load(client: &mut Client, path: &Path) -> Result<v1::Plugin, tonic::Status> {
    client
        .plugins
        .load_plugin(v1::LoadPluginRequest { path: path.display().to_string(), activate: false })
        .await
        .map(tonic::Response::into_inner)
}

#[track_caller]
fn assert_refused(result: Result<v1::Plugin, tonic::Status>, what: &str, reason: &str) {
    let status = match result {
        Ok(plugin) => panic!("{what} was loaded: {plugin:?}"),
        Err(status) => status,
    };
    assert_eq!(status.code(), Code::FailedPrecondition, "{what}: {status:?}");
    assert!(status.message().contains(reason), "{what}: {:?} does not say {reason:?}", status.message());
}

async fn plugins(client: &mut Client) -> Vec<v1::Plugin> {
    client.plugins.list_plugins(v1::ListPluginsRequest::default()).await.unwrap().into_inner().plugins
}

async fn plugin_named(client: &mut Client, name: &str) -> v1::Plugin {
    plugins(client).await.into_iter().find(|p| p.name == name).unwrap_or_else(|| panic!("no plugin {name}"))
}

async fn echo_round_trip(address: std::net::SocketAddr, message: &[u8]) {
    let mut stream = within("a connection", TcpStream::connect(address)).await.unwrap();
    stream.write_all(message).await.unwrap();
    let mut back = vec![0u8; message.len()];
    within("an echo", stream.read_exact(&mut back)).await.unwrap();
    assert_eq!(back, message);
}

/// A line of `/proc/PID/status`, in KiB.
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// A flag value the harness takes as `&'static str`.
fn leak(path: &Path) -> &'static str {
    Box::leak(path.display().to_string().into_boxed_str())
}

/// A binary daemon whose only plugin directory is `dir` (prepared by the
/// test), with `extra` flags.
fn daemon_on(dir: &Path, extra: &[&'static str]) -> Daemon {
    let mut args = vec!["--plugin-dir", leak(dir)];
    args.extend_from_slice(extra);
    Daemon::start_with(Options { plugins: Vec::new(), args, ..Options::default() })
}

/// The log lines that mention `needle`.
fn log_lines(daemon: &Daemon, needle: &str) -> Vec<String> {
    daemon.log().lines().filter(|l| l.contains(needle)).map(str::to_string).collect()
}

/// Waits for a log line that says both `needle` and `also` (the log thread
/// writes a moment after the record).
async fn logged(daemon: &Daemon, needle: &str, also: &str) {
    eventually!(
        async || log_lines(daemon, needle).iter().any(|line| line.contains(also)),
        "a log line with {needle:?} and {also:?}; log:\n{}",
        daemon.log()
    )
    .await;
}

#[test]
fn truncated_and_corrupt_libraries_are_refused_with_the_reason_and_the_daemon_lives_on() {
    let mut daemon = Daemon::start();
    let plugin_dir = daemon.dir().join("plugins");
    runtime().block_on(async {
        let mut client = daemon.client().await;
        let (_, address) = client.start_listener("echo", &[]).await;
        for (name, bytes, reason) in broken_libraries() {
            let path = plugin_dir.join(name);
            std::fs::write(&path, &bytes).unwrap();
            assert_refused(load(&mut client, &path).await, name, reason);
            assert_refused(
                load(&mut client, &path).await,
                name,
                &format!("{}: not a loadable library", path.display()),
            );
        }
        daemon.assert_running();
        echo_round_trip(address, b"still echoing").await;
        assert_eq!(plugin_named(&mut client, "echo").await.generations.len(), 1, "nothing else was loaded");
    });
}

#[test]
fn a_library_loaded_while_it_is_being_written_is_refused_until_it_is_complete() {
    let mut daemon = Daemon::start();
    let path = daemon.dir().join("plugins").join("growing.so");
    let echo = echo_bytes();
    runtime().block_on(async {
        let mut client = daemon.client().await;
        let (_, address) = client.start_listener("echo", &[]).await;
        // The writer appends to the same file (one inode, as a linker
        // writing its output does); a load is asked for after each step.
        let mut file = File::create(&path).unwrap();
        let mut written = 0;
        let steps = 16;
        for step in 1..steps {
            let upto = echo.len() * step / steps;
            std::io::Write::write_all(&mut file, &echo[written..upto]).unwrap();
            written = upto;
            assert_refused(
                load(&mut client, &path).await,
                &format!("{written} of {} bytes", echo.len()),
                "truncated or corrupt",
            );
        }
        std::io::Write::write_all(&mut file, &echo[written..]).unwrap();
        let plugin = load(&mut client, &path).await.expect("the complete library loads");
        assert_eq!(plugin.generations.len(), 2);
        daemon.assert_running();
        echo_round_trip(address, b"still echoing").await;
    });
}

#[test]
fn a_library_dlopen_refuses_is_refused_with_dlerrors_reason() {
    let daemon = Daemon::start();
    // A dependency that does not exist: the headers are sound, dlopen
    // itself refuses.
    let mut bytes = echo_bytes();
    let needed = b"libgcc_s.so.1";
    let at = bytes.windows(needed.len()).position(|w| w == needed).expect("echo needs libgcc_s");
    bytes[at..at + needed.len()].copy_from_slice(b"libgcc_q.so.1");
    let path = daemon.dir().join("plugins").join("missing-dependency.so");
    std::fs::write(&path, &bytes).unwrap();
    runtime().block_on(async {
        let mut client = daemon.client().await;
        assert_refused(
            load(&mut client, &path).await,
            "a library with a missing dependency",
            "not a loadable library: libgcc_q.so.1: cannot open shared object file: No such file or directory",
        );
    });
}

#[test]
fn the_start_up_scan_skips_broken_libraries_with_a_log_line_and_serves_the_others() {
    let dir = TempDir::new("broken-scan");
    std::fs::write(dir.path().join("echo.so"), echo_bytes()).unwrap();
    let broken = broken_libraries();
    for (name, bytes, _) in &broken {
        std::fs::write(dir.path().join(name), bytes).unwrap();
    }
    let mut daemon = daemon_on(dir.path(), &[]);
    runtime().block_on(async {
        let mut client = daemon.client().await;
        for (name, _, reason) in &broken {
            let skipping = format!("skipping {}", dir.path().join(name).display());
            logged(&daemon, &skipping, reason).await;
        }
        let echo = plugin_named(&mut client, "echo").await;
        assert_eq!(echo.generations.len(), 1);
        let (_, address) = client.start_listener("echo", &[]).await;
        echo_round_trip(address, b"started").await;
        daemon.assert_running();
    });
}

#[test]
fn the_start_up_scan_refuses_a_symlink_out_of_the_plugin_directory_as_load_plugin_does() {
    let outside = TempDir::new("outside");
    let lines = outside.path().join("liblines.so");
    std::fs::copy(plugin_library("asyncore_plugin_lines"), &lines).unwrap();
    let dir = TempDir::new("symlink-scan");
    std::fs::write(dir.path().join("echo.so"), echo_bytes()).unwrap();
    let link = dir.path().join("lines.so");
    std::os::unix::fs::symlink(&lines, &link).unwrap();

    let daemon = daemon_on(dir.path(), &[]);
    runtime().block_on(async {
        let mut client = daemon.client().await;
        let names: Vec<String> = plugins(&mut client).await.into_iter().map(|p| p.name).collect();
        assert_eq!(names, ["echo"], "the symlink out of the plugin directory is not loaded");
        logged(&daemon, &format!("skipping {}", link.display()), "outside the plugin directories").await;
        // LoadPlugin says the same of it.
        let refused = load(&mut client, &link).await.unwrap_err();
        assert_eq!(refused.code(), Code::PermissionDenied);
    });
    drop(daemon);

    // One policy: with any path allowed, the scan loads it too.
    let daemon = daemon_on(dir.path(), &["--allow-any-plugin-path"]);
    runtime().block_on(async {
        let mut client = daemon.client().await;
        let mut names: Vec<String> = plugins(&mut client).await.into_iter().map(|p| p.name).collect();
        names.sort();
        assert_eq!(names, ["echo", "lines"]);
    });
}

/// Sets the modification time of `path` to `seconds` after the epoch.
fn set_mtime(path: &Path, seconds: u64) {
    let file = File::options().write(true).open(path).unwrap();
    file.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(seconds)).unwrap();
}

#[test]
fn of_two_libraries_of_one_plugin_name_the_newest_file_is_current_and_the_other_standby() {
    // Twice, with the newer file first and then last by name: the choice
    // follows the modification time, not the order of the names.
    for (newer, older) in [("b-echo.so", "a-echo.so"), ("a-echo.so", "b-echo.so")] {
        let dir = TempDir::new("duplicates");
        for (name, seconds) in [(newer, 2_000_000_000), (older, 1_000_000_000)] {
            let path = dir.path().join(name);
            std::fs::write(&path, echo_bytes()).unwrap();
            set_mtime(&path, seconds);
        }
        let daemon = daemon_on(dir.path(), &[]);
        runtime().block_on(async {
            let mut client = daemon.client().await;
            let echo = plugin_named(&mut client, "echo").await;
            let current = echo.generations.iter().find(|g| g.generation == echo.current_generation).unwrap();
            assert!(current.path.ends_with(newer), "{newer} (newer) is current: {echo:?}");
            let other = echo.generations.iter().find(|g| g.generation != echo.current_generation).unwrap();
            assert!(other.path.ends_with(older));
            assert_eq!(other.state, v1::GenerationState::Standby as i32);
            let current = format!("current={}", dir.path().join(newer).display());
            logged(&daemon, "2 libraries carry plugin name \"echo\"", &current).await;
        });
    }
}

#[test]
fn a_library_over_the_size_limit_is_refused_and_a_large_one_is_streamed() {
    let daemon = Daemon::start();
    let plugin_dir = daemon.dir().join("plugins");
    runtime().block_on(async {
        let mut client = daemon.client().await;
        let peak_before = status_kib(daemon.pid(), "VmHWM:");

        // Sparse: costs no disk here, and the daemon must not read it.
        let huge = plugin_dir.join("huge.so");
        File::create(&huge).unwrap().set_len(513 << 20).unwrap();
        assert_refused(load(&mut client, &huge).await, "a 513 MiB file", "larger than the 512 MiB");

        // A real library with 128 MiB after it (a build with huge debug
        // info): it loads, and the copy and hash stream through a small
        // buffer.
        let padded = plugin_dir.join("padded.so");
        let echo = echo_bytes();
        std::fs::write(&padded, &echo).unwrap();
        File::options().write(true).open(&padded).unwrap().set_len(echo.len() as u64 + (128 << 20)).unwrap();
        let plugin = load(&mut client, &padded).await.expect("a large library within the limit loads");
        assert_eq!(plugin.generations.len(), 2);

        let peak_after = status_kib(daemon.pid(), "VmHWM:");
        assert!(
            peak_after < peak_before + 32 * 1024,
            "peak resident memory went from {peak_before} KiB to {peak_after} KiB"
        );
    });
}

/// `asyncored-PID` directories in `dir`.
fn private_dirs(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("asyncored-"))
        .collect();
    names.sort();
    names
}

/// The files in `dir`, sorted.
fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn private_copies_live_as_long_as_their_generation_and_stale_directories_of_gone_daemons_are_removed() {
    let tmp = TempDir::new("tmpdir");
    // A daemon killed mid-load left its directory; its process is gone.
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    let gone_pid = gone.id();
    gone.wait().unwrap();
    let stale = tmp.path().join(format!("asyncored-{gone_pid}"));
    std::fs::create_dir(&stale).unwrap();
    std::fs::write(stale.join("libasyncore_plugin_echo-1.so"), b"left behind").unwrap();
    // This test process is alive: its name stays.
    let alive = format!("asyncored-{}", std::process::id());
    std::fs::create_dir(tmp.path().join(&alive)).unwrap();

    let mut daemon = Daemon::start_with(Options {
        env: vec![("TMPDIR".into(), tmp.path().display().to_string())],
        ..Options::default()
    });
    let own = format!("asyncored-{}", daemon.pid());
    let mut expected = vec![alive.clone(), own.clone()];
    expected.sort();
    assert_eq!(
        private_dirs(tmp.path()),
        expected,
        "the stale directory went at start; the daemon's own holds its copies"
    );
    let copies = files_in(&tmp.path().join(&own));
    assert!(copies.iter().any(|name| name.starts_with("libasyncore_plugin_echo-")), "{copies:?}");
    // Mapped from a file that is there, so profilers can read its symbols.
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", daemon.pid())).unwrap();
    let echo_maps: Vec<&str> = maps.lines().filter(|l| l.contains("libasyncore_plugin_echo-")).collect();
    assert!(!echo_maps.is_empty() && echo_maps.iter().all(|l| !l.ends_with("(deleted)")), "{echo_maps:#?}");
    runtime().block_on(async {
        let mut client = daemon.client().await;
        let plugin = client
            .plugins
            .reload_plugin(v1::ReloadPluginRequest { name: "echo".into(), ..Default::default() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(plugin.current_generation, 2);
        // echo@1 stays loaded (on standby, for a rollback) and keeps its copy.
        let echo_copies = files_in(&tmp.path().join(&own)).into_iter().filter(|n| n.contains("echo")).count();
        assert_eq!(echo_copies, 2);
        client
            .plugins
            .unload_plugin(v1::UnloadPluginRequest { name: "echo".into(), generation: Some(1), force: false })
            .await
            .unwrap();
        let echo_copies = files_in(&tmp.path().join(&own)).into_iter().filter(|n| n.contains("echo")).count();
        assert_eq!(echo_copies, 1, "an unloaded generation's copy goes with it");
    });
    let status = runtime().block_on(daemon.signal_and_wait(15));
    assert!(status.success(), "{status}");
    assert_eq!(private_dirs(tmp.path()), [alive], "the daemon's directory goes when it exits");
}

/// Waits until the log has `count` lines of the watcher finding echo's
/// library incomplete, the last one saying why (`reason`, when given).
async fn incomplete_seen(daemon: &Daemon, count: usize, reason: Option<&str>) {
    eventually!(
        async || {
            let lines: Vec<String> = log_lines(daemon, "waiting for the file to change")
                .into_iter()
                .filter(|l| l.contains("plugin=echo"))
                .collect();
            lines.len() >= count && reason.is_none_or(|reason| lines[count - 1].contains(reason))
        },
        "{count} log lines of the watcher waiting for echo's library, the last with {reason:?}; log:\n{}",
        daemon.log()
    )
    .await;
}

#[test]
fn watch_waits_for_a_complete_library_and_keeps_the_current_generation_meanwhile() {
    let mut daemon = Daemon::start_with(Options { args: vec!["--watch"], ..Options::default() });
    let library = daemon.dir().join("plugins").join(plugin_library("asyncore_plugin_echo").file_name().unwrap());
    let echo = echo_bytes();
    runtime().block_on(async {
        let mut client = daemon.client().await;
        let (_, address) = client.start_listener("echo", &[]).await;

        // Truncated and corrupt files put in place whole, as a build tool's
        // rename does: each is left alone.
        let mut seen = 0;
        for (_, bytes, reason) in broken_libraries().into_iter().take(6) {
            replace_file(&library, &bytes);
            seen += 1;
            incomplete_seen(&daemon, seen, Some(reason)).await;
            daemon.assert_running();
            echo_round_trip(address, b"still generation 1").await;
        }
        assert_eq!(plugin_named(&mut client, "echo").await.generations.len(), 1, "nothing was reloaded");

        // An in-progress build writing the file in place: half of it, a
        // pause longer than a poll, then the rest.
        let mut rebuilt = echo.clone();
        rebuilt.extend_from_slice(b"\nrebuilt\n");
        let mut file = File::create(&library).unwrap();
        std::io::Write::write_all(&mut file, &rebuilt[..rebuilt.len() / 2]).unwrap();
        seen += 1;
        incomplete_seen(&daemon, seen, None).await;
        std::io::Write::write_all(&mut file, &rebuilt[rebuilt.len() / 2..]).unwrap();
        drop(file);

        let echo_plugin = eventually!(
            async || Some(plugin_named(&mut client, "echo").await).filter(|p| p.current_generation == 2),
            "the watcher to reload the complete library; log:\n{}",
            daemon.log()
        )
        .await;
        assert_eq!(echo_plugin.generations.len(), 2, "no generation came from a partial file");
        let sha256 = asyncore_engine::plugin_host::file_sha256(&library).unwrap();
        assert_eq!(echo_plugin.generations[1].sha256, sha256, "generation 2 is the complete file");
        echo_round_trip(address, b"generation 2").await;
        daemon.assert_running();
    });
}
