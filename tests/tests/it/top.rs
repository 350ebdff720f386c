//! `asyncorectl top` in a real terminal: tmux runs it in a pane against a
//! daemon with traffic; `capture-pane` reads the screen and `send-keys`
//! types. The screen must show the header and a row for the client's
//! channel, keys must change the sort, and `q` must leave the terminal as
//! it was: the alternate screen left and raw mode off (`stty -a`, run in
//! the same pane after `top` exits).

use std::{
    io::{Read, Write},
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Instant,
};

use asyncore_tests::{Daemon, TempDir, binary, connect, eventually, output_within, patience};

use crate::runtime;

/// A tmux server of our own (its own socket, so a developer's sessions are
/// never touched) with one pane running `command`; killed on drop.
struct Tmux {
    socket: PathBuf,
}

impl Tmux {
    /// The pane is `columns` x `rows` and runs `command` with `sh`.
    #[track_caller]
    fn start(dir: &Path, columns: u16, rows: u16, command: &str) -> Tmux {
        let tmux = Tmux { socket: dir.join("tmux.sock") };
        let columns = columns.to_string();
        let rows = rows.to_string();
        let started = tmux.run(&["new-session", "-d", "-s", "top", "-x", &columns, "-y", &rows, "sh", "-c", command]);
        assert!(started.status.success(), "tmux new-session: {}", String::from_utf8_lossy(&started.stderr));
        tmux
    }

    #[track_caller]
    fn run(&self, args: &[&str]) -> Output {
        let mut command = Command::new("tmux");
        command.arg("-S").arg(&self.socket).args(args).env_remove("TMUX");
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| output_within(&mut command))) {
            Ok(output) => output,
            Err(panic) => {
                if Command::new("tmux").arg("-V").output().is_err() {
                    panic!("tmux is missing: `apt-get install tmux` (.ci/run installs it)");
                }
                std::panic::resume_unwind(panic)
            }
        }
    }

    /// What the pane shows now.
    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.run(&["capture-pane", "-p", "-t", "top"]).stdout).into_owned()
    }

    fn alternate_screen_on(&self) -> bool {
        let shown = self.run(&["display-message", "-p", "-t", "top", "#{alternate_on}"]);
        String::from_utf8_lossy(&shown.stdout).trim() == "1"
    }

    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "top"];
        args.extend_from_slice(keys);
        let sent = self.run(&args);
        assert!(sent.status.success(), "tmux send-keys: {}", String::from_utf8_lossy(&sent.stderr));
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux").arg("-S").arg(&self.socket).arg("kill-server").output();
    }
}

/// An echo client that keeps data flowing until dropped (or for at most
/// the patience), so the channel has rates to show.
struct Traffic {
    stop: Arc<AtomicBool>,
    peer: std::net::SocketAddr,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Traffic {
    fn start(address: std::net::SocketAddr) -> Traffic {
        let mut stream = connect(address);
        let peer = stream.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("traffic".to_string())
            .spawn(move || {
                let deadline = Instant::now() + patience();
                let chunk = [7u8; 4096];
                let mut back = [0u8; 4096];
                while !stopped.load(Ordering::Relaxed) && Instant::now() < deadline {
                    if stream.write_all(&chunk).is_err() || stream.read_exact(&mut back).is_err() {
                        return;
                    }
                }
            })
            .unwrap();
        Traffic { stop, peer, thread: Some(thread) }
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[test]
fn top_shows_the_busy_channel_and_q_leaves_a_clean_terminal() {
    let daemon = Daemon::start();
    let address = runtime().block_on(async { daemon.client().await.start_listener("echo", &[]).await.1 });
    let traffic = Traffic::start(address);
    let peer = traffic.peer.to_string();

    let dir = TempDir::new("top");
    let status = dir.path().join("status");
    let stty = dir.path().join("stty");
    // After `top`, the same pane records its exit code and the terminal's
    // modes, then waits to be looked at.
    let command = format!(
        "'{ctl}' --control {control} top --interval 200ms; echo \"exit=$?\" > '{status}'; stty -a > '{stty}'; exec sleep 600",
        ctl = binary("asyncorectl").display(),
        control = daemon.control(),
        status = status.display(),
        stty = stty.display(),
    );
    let tmux = Tmux::start(dir.path(), 160, 30, &command);

    let screen = runtime().block_on(eventually!(
        async || {
            let screen = tmux.screen();
            // CHANNEL LISTENER PLUGIN PEER IN/S OUT/S QUEUED AGE
            let row =
                screen.lines().find(|line| line.contains(&peer)).map(|row| row.split_whitespace().collect::<Vec<_>>());
            let busy = row.is_some_and(|cells| cells.len() == 8 && cells[2] == "echo@1" && cells[4] != "0");
            (busy && screen.contains("loop: ")).then_some(screen)
        },
        "top to show the header and a busy row for {peer}:\n{}",
        tmux.screen()
    ));
    let lines: Vec<&str> = screen.lines().collect();
    assert!(lines[0].starts_with("asyncored ") && lines[0].contains("running"), "{screen}");
    assert!(lines[1].contains("listeners 1 (0 stopped)"), "{screen}");
    assert!(lines[3].starts_with("sort: in+out/s"), "{screen}");
    let columns: Vec<&str> = lines[4].split_whitespace().collect();
    assert_eq!(columns, ["CHANNEL", "LISTENER", "PLUGIN", "PEER", "IN/Sv", "OUT/Sv", "QUEUED", "AGE"], "{screen}");
    assert!(tmux.alternate_screen_on(), "top draws on the alternate screen");

    tmux.keys(&["s"]);
    runtime().block_on(eventually!(
        async || tmux.screen().lines().nth(3).is_some_and(|line| line.starts_with("sort: in/s")),
        "s to sort by in/s:\n{}",
        tmux.screen()
    ));

    tmux.keys(&["q"]);
    let exit = runtime().block_on(eventually!(
        async || std::fs::read_to_string(&status).ok().filter(|s| s.ends_with('\n')),
        "top to exit after q:\n{}",
        tmux.screen()
    ));
    assert_eq!(exit.trim(), "exit=0");
    let modes = runtime().block_on(eventually!(
        async || std::fs::read_to_string(&stty).ok().filter(|s| s.contains("icanon")),
        "stty -a after top"
    ));
    let modes: Vec<&str> = modes.split_whitespace().collect();
    for mode in ["icanon", "echo", "isig", "opost"] {
        assert!(modes.contains(&mode), "raw mode is still on ({mode} off): {modes:?}");
    }
    assert!(!tmux.alternate_screen_on(), "the alternate screen was left");
    let after = tmux.screen();
    assert!(!after.contains("CHANNEL"), "the normal screen is back, without top's frame:\n{after}");
    drop(traffic);
}

#[test]
fn top_without_a_terminal_points_to_stats() {
    let daemon = Daemon::start();
    let output = daemon.ctl(&["top"]);
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("needs a terminal") && stderr.contains("asyncorectl stats"), "{stderr}");
}
