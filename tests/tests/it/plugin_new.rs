//! `asyncorectl plugin new`: the crates it writes pass their own tests,
//! build, and serve from the real daemon, loaded the way their README says;
//! a bad name or a directory in use is refused with one line and exit code
//! 2, before anything is written.

use std::{
    ffi::OsString,
    fs,
    io::{BufRead, BufReader, Read, Write},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use asyncore_tests::{Daemon, Options, TempDir, binary, build_dir, connect, output_within};
use serde_json::Value;

/// How long one `cargo` run may take. The first run compiles the engine and
/// the test harness into `target/external`, which is slow on a small
/// machine; later runs reuse them.
fn cargo_patience() -> Duration {
    let seconds = std::env::var("ASYNCORE_TEST_CARGO_TIMEOUT_SECS").ok().and_then(|text| text.parse().ok());
    Duration::from_secs(seconds.unwrap_or(900))
}

/// Where the generated crates build: beside the workspace's own profiles
/// (`target/debug` holds this test binary's `deps/`), so that repeated runs
/// reuse the compiled dependencies without mixing them with the
/// workspace's.
fn external_target_dir() -> PathBuf {
    build_dir().parent().expect("target/<profile>").join("external")
}

/// Runs `asyncorectl plugin new ARGS` in `cwd`.
#[track_caller]
fn plugin_new(cwd: &Path, args: &[&str]) -> Output {
    output_within(Command::new(binary("asyncorectl")).args(["plugin", "new"]).args(args).current_dir(cwd))
}

/// Stdout of a `plugin new` that must succeed.
#[track_caller]
fn created(cwd: &Path, args: &[&str]) -> String {
    let output = plugin_new(cwd, args);
    assert!(output.status.success(), "plugin new {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap()
}

/// Stderr of a `plugin new` that must be refused: exit code 2, one line.
#[track_caller]
fn refused(cwd: &Path, args: &[&str]) -> String {
    let output = plugin_new(cwd, args);
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(output.status.code(), Some(2), "plugin new {args:?}: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "plugin new {args:?}: {stderr}");
    assert!(stderr.starts_with("asyncorectl: "), "{stderr}");
    assert!(output.stdout.is_empty(), "plugin new {args:?} printed {:?}", String::from_utf8_lossy(&output.stdout));
    stderr
}

/// Runs `cargo ARGS` in `crate_dir` and asserts that it succeeds, killing it
/// after [`cargo_patience`]. Its output goes to `log`, shown on failure.
#[track_caller]
fn cargo(crate_dir: &Path, args: &[&str], log: &Path) {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let log_file = fs::File::create(log).unwrap();
    let mut child = Command::new(cargo)
        .args(args)
        .current_dir(crate_dir)
        .env("CARGO_TARGET_DIR", external_target_dir())
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file)
        .spawn()
        .expect("run cargo");
    let deadline = Instant::now() + cargo_patience();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "cargo {args:?} in {} took more than {:?}:\n{}",
                crate_dir.display(),
                cargo_patience(),
                fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        status.success(),
        "cargo {args:?} in {} failed ({status}):\n{}",
        crate_dir.display(),
        fs::read_to_string(log).unwrap_or_default()
    );
}

/// Loads `library` into `daemon` and serves it on a new listener with the
/// commands the generated README gives; returns the listener's address.
#[track_caller]
fn load_and_serve(daemon: &Daemon, library: &Path, name: &str) -> String {
    let ctl_json = |args: &[&str]| -> Value {
        let output = daemon.ctl(&[&["-o", "json"], args].concat());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "asyncorectl {args:?} failed: {stderr}\ndaemon log:\n{}", daemon.log());
        serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("asyncorectl {args:?}: not JSON ({e})"))
    };
    // `plugins load` sends the daemon `LoadPlugin` with the absolute path.
    let plugin = ctl_json(&["plugins", "load", library.to_str().unwrap()]);
    assert_eq!(plugin["name"], name, "{plugin}");
    let listener = ctl_json(&["listeners", "start", "127.0.0.1:0", name]);
    listener["address"].as_str().unwrap_or_else(|| panic!("no address in {listener}")).to_owned()
}

#[test]
fn new_crates_test_build_and_serve_from_the_daemon() {
    let work = TempDir::new("plugin-new");
    // The echo plugin goes to the default directory, ./NAME; the chat one to
    // a directory that exists already, empty, which is accepted.
    let echo_dir = work.path().join("greeter");
    let chat_dir = work.path().join("chat");
    fs::create_dir(&chat_dir).unwrap();
    let printed = created(work.path(), &["greeter"]);
    assert!(printed.starts_with("created greeter: cd greeter && cargo test\n"), "{printed}");
    let printed = created(work.path(), &["shout-chat", "--chat", "--dir", "chat"]);
    assert!(printed.contains("target/debug/libshout_chat.so"), "{printed}");

    for crate_dir in [&echo_dir, &chat_dir] {
        for file in ["Cargo.toml", "README.md", "src/lib.rs", "tests/plugin.rs"] {
            assert!(crate_dir.join(file).is_file(), "{} has no {file}", crate_dir.display());
        }
        // Its own tests (on the real engine), then the library the daemon
        // loads.
        cargo(crate_dir, &["test"], &work.path().join("cargo-test.log"));
        cargo(crate_dir, &["build"], &work.path().join("cargo-build.log"));
    }
    let libraries = external_target_dir().join("debug");
    let echo_library = libraries.join(format!("libgreeter.{}", std::env::consts::DLL_EXTENSION));
    let chat_library = libraries.join(format!("libshout_chat.{}", std::env::consts::DLL_EXTENSION));

    // The libraries stay where cargo wrote them, outside the daemon's plugin
    // directory, as the README's `plugins load target/debug/...` has it.
    let daemon = Daemon::start_with(Options { config: "allow_any_plugin_path = true\n".into(), ..Options::default() });
    let echo_address = load_and_serve(&daemon, &echo_library, "greeter");
    let chat_address = load_and_serve(&daemon, &chat_library, "shout-chat");

    let mut echo = connect(echo_address.parse().unwrap());
    echo.write_all(b"hello from a new plugin").unwrap();
    let mut back = [0u8; 23];
    echo.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"hello from a new plugin");

    let mut chat = connect(chat_address.parse().unwrap());
    chat.write_all(b"first\nsecond line\n").unwrap();
    let mut lines = BufReader::new(chat);
    for expected in ["FIRST\n", "SECOND LINE\n"] {
        let mut line = String::new();
        lines.read_line(&mut line).unwrap();
        assert_eq!(line, expected);
    }
}

#[test]
fn bad_names_and_directories_in_use_are_refused() {
    let work = TempDir::new("plugin-new-refused");

    // A directory with something in it is left as it was.
    let taken = work.path().join("taken");
    fs::create_dir(&taken).unwrap();
    fs::write(taken.join("notes.txt"), "mine").unwrap();
    let stderr = refused(work.path(), &["fresh", "--dir", "taken"]);
    assert!(stderr.contains("taken exists and is not empty"), "{stderr}");
    let entries: Vec<_> = fs::read_dir(&taken).unwrap().map(|entry| entry.unwrap().file_name()).collect();
    assert_eq!(entries, ["notes.txt"]);

    // So is a file where the directory would go.
    fs::write(work.path().join("file"), "").unwrap();
    let stderr = refused(work.path(), &["file"]);
    assert!(stderr.contains("file exists and is not a directory"), "{stderr}");

    // Names Cargo or Rust would refuse, before any directory is made.
    for name in ["Upper", "9lives", "_under", "with space", "x.y", "fn", "std"] {
        let stderr = refused(work.path(), &[name]);
        assert!(stderr.starts_with(&format!("asyncorectl: invalid plugin name {name:?}: ")), "{stderr}");
    }

    // An SDK that is not a checkout of the repository.
    let stderr = refused(work.path(), &["fresh", "--sdk", "taken"]);
    assert!(stderr.contains("has no sdk/Cargo.toml"), "{stderr}");

    let mut left: Vec<_> = fs::read_dir(work.path()).unwrap().map(|entry| entry.unwrap().file_name()).collect();
    left.sort();
    assert_eq!(left, ["file", "taken"], "a refused request wrote nothing");
}
