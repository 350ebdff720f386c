//! Persisted runtime state (`--state-dir`): the real binary, killed with
//! SIGKILL at random points of random API changes, comes back with exactly
//! the listeners and plugin generations it had acknowledged; a corrupt
//! state file, and one naming a library that changed or vanished, are
//! reported and moved aside while the rest is restored; a config listener
//! on port 0 comes back on its port, once; changes made over HTTP are
//! saved too.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use asyncore_proto::v1;
use asyncore_tests::{
    Client, Daemon, InProcessDaemon, Options, Rng, TempDir, eventually, plugin_library, replace_file, within,
};
use serde_json::json;

use crate::{http_api::Http, runtime};

/// A daemon with no plugin directory libraries, any plugin path allowed,
/// and its state in `state_dir`.
fn start(state_dir: &Path) -> Daemon {
    Daemon::start_with(Options {
        plugins: Vec::new(),
        config: format!("state_dir = {:?}\n", state_dir.display().to_string()),
        args: vec!["--allow-any-plugin-path"],
        ..Options::default()
    })
}

/// The libraries the tests load, copied where they stay put for the whole
/// test (a rebuild of the workspace cannot change them under it).
struct Libraries {
    _dir: TempDir,
    echo: PathBuf,
    v1: PathBuf,
    v2: PathBuf,
}

impl Libraries {
    fn new() -> Libraries {
        let dir = TempDir::new("state-libs");
        let copy = |crate_name: &str, file: &str| {
            let path = dir.path().join(file);
            std::fs::copy(plugin_library(crate_name), &path).unwrap();
            path
        };
        let echo = copy("asyncore_plugin_echo", "echo.so");
        let v1 = copy("asyncore_fixture_versioned_v1", "versioned-v1.so");
        let v2 = copy("asyncore_fixture_versioned_v2", "versioned-v2.so");
        Libraries { _dir: dir, echo, v1, v2 }
    }
}

/// A listener as the state keeps it: address, plugin, config, whether
/// suspended. A listener started on port 0 by a call whose answer never
/// came is `127.0.0.1:0` in a prediction, and matches any port.
type Listener = (String, String, BTreeMap<String, String>, bool);

/// What must survive a restart: the listeners, and for each plugin its
/// current generation (0: none) and its generations that are not retired,
/// with their sha256.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Snapshot {
    listeners: Vec<Listener>,
    plugins: BTreeMap<String, (u32, BTreeSet<(u32, String)>)>,
}

impl Snapshot {
    /// The snapshot without the listeners on `addresses`.
    fn without(&self, addresses: &[String]) -> Snapshot {
        let mut rest = self.clone();
        rest.listeners.retain(|l| !addresses.contains(&l.0));
        rest
    }

    /// Whether `restored` is this snapshot, a port-0 listener of it
    /// matching a listener on any port.
    fn matches(&self, restored: &Snapshot) -> bool {
        if self.plugins != restored.plugins || self.listeners.len() != restored.listeners.len() {
            return false;
        }
        let mut left = restored.listeners.clone();
        // The exact ones first, so a wildcard does not take another's.
        let (wild, exact): (Vec<&Listener>, Vec<&Listener>) =
            self.listeners.iter().partition(|(address, ..)| address.ends_with(":0"));
        for wanted in exact.into_iter().chain(wild) {
            let found = left.iter().position(|got| {
                got.1 == wanted.1
                    && got.2 == wanted.2
                    && got.3 == wanted.3
                    && (got.0 == wanted.0
                        || (wanted.0.ends_with(":0") && got.0.rsplit_once(':').map(|(ip, _)| ip) == Some("127.0.0.1")))
            });
            match found {
                Some(index) => {
                    left.remove(index);
                }
                None => return false,
            }
        }
        true
    }
}

/// The addresses of saved listeners that could not listen again because
/// another socket had taken the port, as the daemon's log reports them.
fn taken_ports(log: &str) -> Vec<String> {
    log.lines()
        .filter(|line| line.contains("is already in use; not restored"))
        .filter_map(|line| line.split("runtime state: listener ").nth(1)?.split(' ').next().map(str::to_string))
        .collect()
}

/// The first page of `ListListeners` (the tests start fewer than 200).
async fn list_listeners(client: &mut Client) -> Vec<v1::Listener> {
    let request = v1::ListListenersRequest { page_size: 200, page_token: String::new() };
    client.listeners.list_listeners(request).await.expect("ListListeners").into_inner().listeners
}

/// Everything `ListListeners` and `ListPlugins` say, and the newest
/// generation number of each plugin (retired ones included: the next load
/// gets the number after it).
async fn observe(client: &mut Client) -> (Snapshot, BTreeMap<String, u32>) {
    let listeners = list_listeners(client).await;
    let plugins =
        client.plugins.list_plugins(v1::ListPluginsRequest::default()).await.expect("ListPlugins").into_inner().plugins;
    let mut snapshot = Snapshot::default();
    for listener in listeners.into_iter().filter(bound) {
        let suspended = listener.state == v1::ListenerState::Suspended as i32;
        snapshot.listeners.push((listener.address, listener.plugin, listener.config.into_iter().collect(), suspended));
    }
    snapshot.listeners.sort();
    let mut newest = BTreeMap::new();
    for plugin in plugins {
        newest.insert(plugin.name.clone(), plugin.generations.iter().map(|g| g.generation).max().unwrap_or(0));
        let live: BTreeSet<(u32, String)> = plugin
            .generations
            .iter()
            .filter(|g| g.state != v1::GenerationState::Retired as i32)
            .map(|g| (g.generation, g.sha256.clone()))
            .collect();
        if !live.is_empty() {
            snapshot.plugins.insert(plugin.name, (plugin.current_generation, live));
        }
    }
    (snapshot, newest)
}

/// One change through the API.
#[derive(Debug, Clone)]
enum Change {
    Start {
        plugin: String,
        config: BTreeMap<String, String>,
    },
    Stop {
        id: u64,
        address: String,
    },
    Suspend {
        id: u64,
        address: String,
    },
    Resume {
        id: u64,
        address: String,
    },
    /// 0: no limit.
    Limit {
        id: u64,
        address: String,
        max_connections: u64,
    },
    Load {
        path: PathBuf,
        sha256: String,
        activate: bool,
    },
    Reload {
        path: PathBuf,
        sha256: String,
    },
    Activate {
        generation: u32,
    },
    Unload {
        generation: u32,
    },
}

const PLUGIN: &str = "versioned";

impl Change {
    fn kind(&self) -> &'static str {
        match self {
            Change::Start { .. } => "start",
            Change::Stop { .. } => "stop",
            Change::Suspend { .. } => "suspend",
            Change::Resume { .. } => "resume",
            Change::Limit { .. } => "limit",
            Change::Load { .. } => "load",
            Change::Reload { .. } => "reload",
            Change::Activate { .. } => "activate",
            Change::Unload { .. } => "unload",
        }
    }

    /// A change that makes sense in `state`.
    fn pick(rng: &mut Rng, state: &Snapshot, ids: &BTreeMap<String, u64>, libraries: &[(PathBuf, String)]) -> Change {
        let (current, generations) = state.plugins.get(PLUGIN).cloned().unwrap_or_default();
        let library = libraries[rng.range(0, libraries.len() - 1)].clone();
        loop {
            match rng.range(0, 11) {
                0..=2 => {
                    let plugin = if current != 0 && rng.range(0, 1) == 0 { PLUGIN } else { "echo" };
                    let config = BTreeMap::from([("note".to_string(), format!("n{}", rng.range(0, 999)))]);
                    return Change::Start { plugin: plugin.into(), config };
                }
                3..=5 if !state.listeners.is_empty() => {
                    let (address, _, _, suspended) = &state.listeners[rng.range(0, state.listeners.len() - 1)];
                    let (id, address) = (ids[address], address.clone());
                    return match rng.range(0, 3) {
                        0 => Change::Stop { id, address },
                        1 if *suspended => Change::Resume { id, address },
                        1 => Change::Suspend { id, address },
                        _ => Change::Limit { id, address, max_connections: [0, 1, 100][rng.range(0, 2)] },
                    };
                }
                6 | 7 if generations.len() < 5 => {
                    let (path, sha256) = library;
                    return Change::Load { path, sha256, activate: rng.range(0, 1) == 0 };
                }
                8 if generations.len() < 5 && current != 0 => {
                    let (path, sha256) = library;
                    return Change::Reload { path, sha256 };
                }
                9 => {
                    let others: Vec<u32> = generations.iter().map(|g| g.0).filter(|&g| g != current).collect();
                    if !others.is_empty() {
                        return Change::Activate { generation: others[rng.range(0, others.len() - 1)] };
                    }
                }
                10 | 11 => {
                    // Not the current one while a listener uses it: that is
                    // refused, and a refusal changes nothing to check.
                    let used = state.listeners.iter().any(|l| l.1 == PLUGIN);
                    let candidates: Vec<u32> =
                        generations.iter().map(|g| g.0).filter(|&g| g != current || !used).collect();
                    if !candidates.is_empty() {
                        return Change::Unload { generation: candidates[rng.range(0, candidates.len() - 1)] };
                    }
                }
                _ => {}
            }
        }
    }

    /// Sends the change; `Ok` carries the state it leads to, as far as the
    /// answer tells.
    async fn send(&self, client: &mut Client) -> Result<Option<String>, tonic::Status> {
        match self.clone() {
            Change::Start { plugin, config } => {
                let request = v1::StartListenerRequest {
                    address: "127.0.0.1:0".into(),
                    plugin,
                    config: config.into_iter().collect(),
                };
                let listener = client.listeners.start_listener(request).await?.into_inner();
                Ok(Some(listener.address))
            }
            Change::Stop { id, .. } => {
                client
                    .listeners
                    .stop_listener(v1::StopListenerRequest { id, close_channels: true, drain_timeout_ms: None })
                    .await?;
                Ok(None)
            }
            Change::Suspend { id, .. } => {
                client.listeners.suspend_listener(v1::SuspendListenerRequest { id }).await?;
                Ok(None)
            }
            Change::Resume { id, .. } => {
                client.listeners.resume_listener(v1::ResumeListenerRequest { id }).await?;
                Ok(None)
            }
            Change::Limit { id, max_connections, .. } => {
                client.listeners.set_listener_limits(v1::SetListenerLimitsRequest { id, max_connections }).await?;
                Ok(None)
            }
            Change::Load { path, activate, .. } => {
                let request = v1::LoadPluginRequest { path: path.display().to_string(), activate };
                client.plugins.load_plugin(request).await?;
                Ok(None)
            }
            Change::Reload { path, .. } => {
                let request = v1::ReloadPluginRequest {
                    name: PLUGIN.into(),
                    path: path.display().to_string(),
                    drain_timeout_ms: 0,
                };
                client.plugins.reload_plugin(request).await?;
                Ok(None)
            }
            Change::Activate { generation } => {
                let request = v1::ActivatePluginRequest { name: PLUGIN.into(), generation, drain_timeout_ms: 0 };
                client.plugins.activate_plugin(request).await?;
                Ok(None)
            }
            Change::Unload { generation } => {
                let request =
                    v1::UnloadPluginRequest { name: PLUGIN.into(), generation: Some(generation), force: false };
                client.plugins.unload_plugin(request).await?;
                Ok(None)
            }
        }
    }

    /// The state after the change, from the state before it: `address` is
    /// where a started listener listens, if known.
    fn apply(&self, before: &Snapshot, newest: &BTreeMap<String, u32>, address: Option<&str>) -> Snapshot {
        let mut after = before.clone();
        let entry = after.plugins.entry(PLUGIN.to_string()).or_default();
        let next = newest.get(PLUGIN).copied().unwrap_or(0) + 1;
        match self {
            Change::Start { plugin, config } => {
                let address = address.unwrap_or("127.0.0.1:0").to_string();
                after.listeners.push((address, plugin.clone(), config.clone(), false));
                after.listeners.sort();
            }
            Change::Stop { address, .. } => after.listeners.retain(|l| &l.0 != address),
            Change::Suspend { address, .. } | Change::Resume { address, .. } => {
                for listener in after.listeners.iter_mut().filter(|l| &l.0 == address) {
                    listener.3 = matches!(self, Change::Suspend { .. });
                }
            }
            Change::Limit { address, max_connections, .. } => {
                for listener in after.listeners.iter_mut().filter(|l| &l.0 == address) {
                    match max_connections {
                        0 => listener.2.remove("max_connections"),
                        n => listener.2.insert("max_connections".to_string(), n.to_string()),
                    };
                }
            }
            Change::Load { sha256, activate, .. } => {
                entry.1.insert((next, sha256.clone()));
                if *activate || entry.0 == 0 {
                    entry.0 = next;
                }
            }
            Change::Reload { sha256, .. } => {
                entry.1.insert((next, sha256.clone()));
                entry.0 = next;
            }
            Change::Activate { generation } => entry.0 = *generation,
            Change::Unload { generation } => {
                entry.1.retain(|g| g.0 != *generation);
                if entry.0 == *generation {
                    entry.0 = 0;
                }
            }
        }
        if after.plugins.get(PLUGIN).is_some_and(|p| p.1.is_empty()) {
            after.plugins.remove(PLUGIN);
        }
        after
    }
}

/// Whether a listener is listening or suspended: what the state keeps.
fn bound(listener: &v1::Listener) -> bool {
    [v1::ListenerState::Listening as i32, v1::ListenerState::Suspended as i32].contains(&listener.state)
}

/// Ids of the listeners by address.
async fn listener_ids(client: &mut Client) -> BTreeMap<String, u64> {
    let listeners = list_listeners(client).await;
    listeners.into_iter().filter(bound).map(|l| (l.address, l.id)).collect()
}

fn sha256_of(path: &Path) -> String {
    asyncore_engine::plugin_host::file_sha256(path).unwrap()
}

/// The crash test of the issue: random changes, SIGKILL at a random point
/// (often while a change is in flight), a restart on the same state
/// directory, and the restored listeners (address, plugin, config) and
/// generations (number, sha256, which is current) are the last
/// acknowledged ones, or those of the change in flight.
#[test]
fn killed_at_random_points_the_daemon_comes_back_with_what_it_acknowledged() {
    runtime().block_on(async {
        let started = Instant::now();
        let libraries = Libraries::new();
        let versioned = [(libraries.v1.clone(), sha256_of(&libraries.v1)), (libraries.v2.clone(), sha256_of(&libraries.v2))];
        let state_dir = TempDir::new("state");
        // A new sequence every run (the seed is printed, and in every
        // failure); `ASYNCORED_CRASH_SEED` replays one.
        let seed = match std::env::var("ASYNCORED_CRASH_SEED") {
            Ok(text) => u64::from_str_radix(text.trim_start_matches("0x"), 16).expect("ASYNCORED_CRASH_SEED in hex"),
            Err(_) => std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64,
        };
        eprintln!("crash test seed {seed:#x} (ASYNCORED_CRASH_SEED={seed:x} replays it)");
        let mut rng = Rng::new(seed);

        let mut daemon = start(state_dir.path());
        let mut client = daemon.client().await;
        let echo = v1::LoadPluginRequest { path: libraries.echo.display().to_string(), activate: true };
        client.plugins.load_plugin(echo).await.expect("load echo");
        let (mut acknowledged, mut newest) = observe(&mut client).await;
        let rounds = 40;
        let (mut changes, mut in_flight_kept, mut in_flight_lost) = (0, 0, 0);
        let mut kinds: BTreeMap<&str, u32> = BTreeMap::new();
        for round in 0..rounds {
            // Acknowledged changes, each checked against the model.
            for _ in 0..rng.range(1, 5) {
                let ids = listener_ids(&mut client).await;
                let change = Change::pick(&mut rng, &acknowledged, &ids, &versioned);
                let answer = within(format!("{change:?}"), change.send(&mut client)).await;
                let (actual, actual_newest) = observe(&mut client).await;
                match answer {
                    Ok(address) => {
                        let predicted = change.apply(&acknowledged, &newest, address.as_deref());
                        assert_eq!(actual, predicted, "round {round}: {change:?} (seed {seed:#x})");
                        changes += 1;
                        *kinds.entry(change.kind()).or_insert(0) += 1;
                    }
                    Err(status) => {
                        assert_eq!(actual, acknowledged, "round {round}: refused {change:?} changed things: {status}")
                    }
                }
                (acknowledged, newest) = (actual, actual_newest);
            }
            // The kill, mostly while one more change is in flight.
            let ids = listener_ids(&mut client).await;
            let change = Change::pick(&mut rng, &acknowledged, &ids, &versioned);
            let in_flight = rng.range(0, 4) != 0;
            let sent = in_flight.then(|| {
                let (change, mut client) = (change.clone(), client.clone());
                tokio::spawn(async move { change.send(&mut client).await })
            });
            tokio::time::sleep(Duration::from_micros(rng.range(0, 6000) as u64)).await;
            drop(daemon);
            let answer = match sent {
                Some(task) => Some(within("the change in flight to end", task).await.unwrap()),
                None => None,
            };

            daemon = start(state_dir.path());
            client = daemon.client().await;
            let (restored, restored_newest) = observe(&mut client).await;
            // The restore's last line is written after its problem lines
            // (the log has a thread of its own, a moment behind).
            let ended = ["runtime state restored", "moved aside", "no runtime state saved yet"];
            eventually!(async || ended.iter().any(|line| daemon.log().contains(line)), "the restore's last line").await;
            let log = daemon.log();
            // Between the kill and the restart another test's socket may
            // take a restored listener's port: reported, and not this
            // test's to check.
            let taken = taken_ports(&log);
            let acknowledged_now = acknowledged.without(&taken);
            let context = format!("round {round}, seed {seed:#x}, restored {restored:#?}\n{log}");
            match answer {
                None => assert!(
                    acknowledged_now.matches(&restored),
                    "no change in flight; acknowledged {acknowledged:#?}\n{context}"
                ),
                Some(Ok(address)) => {
                    let predicted = change.apply(&acknowledged, &newest, address.as_deref()).without(&taken);
                    assert!(predicted.matches(&restored), "{change:?} was acknowledged; expected {predicted:#?}\n{context}");
                    in_flight_kept += 1;
                }
                Some(Err(_)) => {
                    let predicted = change.apply(&acknowledged, &newest, None).without(&taken);
                    let kept = predicted.matches(&restored) && !acknowledged_now.matches(&restored);
                    assert!(
                        kept || acknowledged_now.matches(&restored),
                        "{change:?} in flight; acknowledged {acknowledged:#?}\nor {predicted:#?}\n{context}"
                    );
                    if kept {
                        in_flight_kept += 1;
                    } else {
                        in_flight_lost += 1;
                    }
                }
            }
            if taken.is_empty() {
                assert!(!log.contains("moved aside"), "round {round}: the state was moved aside:\n{log}");
            } else {
                eprintln!("round {round}: ports taken by other sockets meanwhile: {taken:?}");
            }
            // The restored listeners listen.
            for (address, ..) in &restored.listeners {
                let _ = asyncore_tests::connect(address.parse().unwrap());
            }
            (acknowledged, newest) = (restored, restored_newest);
        }
        eprintln!(
            "{rounds} rounds, {changes} acknowledged changes checked ({kinds:?}), in flight at the kill: {in_flight_kept} kept, {in_flight_lost} lost, in {:?}",
            started.elapsed()
        );
    });
}

/// The files moved aside in `dir`.
fn moved_aside(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("state.json.bad-"))
        .collect();
    files.sort();
    files
}

#[test]
fn a_corrupt_state_file_is_moved_aside_and_reported_and_the_daemon_starts() {
    runtime().block_on(async {
        let state_dir = TempDir::new("state-corrupt");
        let garbage = b"{\"version\": 1, \"listeners\": [ truncated";
        std::fs::write(state_dir.path().join("state.json"), garbage).unwrap();
        let daemon = start(state_dir.path());
        eventually!(
            async || daemon.log().contains("is not a valid state file") && daemon.log().contains("moved aside"),
            "the corrupt state reported in the log:\n{}",
            daemon.log()
        )
        .await;
        let aside = moved_aside(state_dir.path());
        assert_eq!(aside.len(), 1, "{aside:?}");
        assert_eq!(std::fs::read(&aside[0]).unwrap(), garbage, "moved aside as it was");
        // A fresh state of what runs.
        let fresh: serde_json::Value =
            serde_json::from_slice(&std::fs::read(state_dir.path().join("state.json")).unwrap()).unwrap();
        assert_eq!(fresh["listeners"], serde_json::json!([]));
        let mut client = daemon.client().await;
        client.plugins.list_plugins(v1::ListPluginsRequest::default()).await.expect("the daemon serves");
    });
}

/// A state naming a library whose content changed since, and one that
/// vanished: both reported by name and left out, the file moved aside, and
/// the rest (the echo plugin and its listener) restored.
#[test]
fn a_changed_or_vanished_library_is_reported_and_the_rest_is_restored() {
    runtime().block_on(async {
        let libraries = Libraries::new();
        let state_dir = TempDir::new("state-changed");
        let spare = libraries.v1.with_file_name("versioned-spare.so");
        std::fs::copy(&libraries.v1, &spare).unwrap();
        let daemon = start(state_dir.path());
        let mut client = daemon.client().await;
        for (path, activate) in [(&libraries.echo, true), (&libraries.v1, true), (&spare, false)] {
            let request = v1::LoadPluginRequest { path: path.display().to_string(), activate };
            client.plugins.load_plugin(request).await.expect("load");
        }
        let (_, echo_address) = client.start_listener("echo", &[("note", "kept")]).await;
        client.start_listener(PLUGIN, &[]).await;
        drop(daemon);

        // A rebuild of v1 in place, and the spare copy gone.
        replace_file(&libraries.v1, &std::fs::read(&libraries.v2).unwrap());
        std::fs::remove_file(&spare).unwrap();
        let daemon = start(state_dir.path());
        let mut client = daemon.client().await;
        eventually!(async || daemon.log().contains("moved aside"), "the state moved aside:\n{}", daemon.log()).await;
        let log = daemon.log();
        let v1_path = libraries.v1.display().to_string();
        assert!(log.contains(&format!("plugin versioned@1: library {v1_path} changed")), "{log}");
        assert!(log.contains(&format!("plugin versioned@2: library {} vanished", spare.display())), "{log}");
        assert!(log.contains("listener") && log.contains("(versioned)"), "the versioned listener reported:\n{log}");
        assert_eq!(moved_aside(state_dir.path()).len(), 1);

        let (restored, _) = observe(&mut client).await;
        let echo_sha256 = sha256_of(&libraries.echo);
        assert_eq!(restored.plugins.keys().collect::<Vec<_>>(), ["echo"], "{restored:?}");
        assert_eq!(restored.plugins["echo"], (1, BTreeSet::from([(1, echo_sha256)])));
        let kept = BTreeMap::from([("note".to_string(), "kept".to_string())]);
        assert_eq!(restored.listeners, vec![(echo_address.to_string(), "echo".to_string(), kept, false)]);
        let _ = asyncore_tests::connect(echo_address);
        // The fresh state is what runs: restarting again restores it all.
        drop(daemon);
        let daemon = start(state_dir.path());
        let mut client = daemon.client().await;
        assert_eq!(observe(&mut client).await.0, restored);
        assert!(!daemon.log().contains("moved aside"), "{}", daemon.log());
    });
}

/// A state written by hand: the echo library as generation `numbers`, each
/// in turn, the last current.
fn state_naming_echo(libraries: &Libraries, numbers: &[u32]) -> String {
    let generations: Vec<serde_json::Value> = numbers
        .iter()
        .map(|n| {
            serde_json::json!({
                "generation": n,
                "path": libraries.echo.display().to_string(),
                "sha256": sha256_of(&libraries.echo),
            })
        })
        .collect();
    let state = serde_json::json!({
        "version": 1,
        "listeners": [],
        "plugins": [{ "name": "echo", "current": numbers.last(), "generations": generations }],
    });
    serde_json::to_string_pretty(&state).unwrap()
}

/// A listener of the config file on port 0 comes back on the port it got,
/// once (not also as a saved listener), next to a listener started through
/// the API.
#[test]
fn a_config_listener_on_port_0_comes_back_on_its_port_once() {
    runtime().block_on(async {
        let libraries = Libraries::new();
        let state_dir = TempDir::new("state-config");
        // The plugin comes from the state: the harness's plugin directory
        // is another one at each start.
        std::fs::write(state_dir.path().join("state.json"), state_naming_echo(&libraries, &[4])).unwrap();
        let options = Options {
            plugins: Vec::new(),
            config: format!(
                "state_dir = {:?}\n[[listener]]\naddress = \"127.0.0.1:0\"\nplugin = \"echo\"\nconfig = {{ note = \"from-config\" }}\n",
                state_dir.path().display().to_string()
            ),
            args: vec!["--allow-any-plugin-path"],
            ..Options::default()
        };
        let daemon = Daemon::start_with(options.clone());
        let mut client = daemon.client().await;
        let (before, _) = observe(&mut client).await;
        assert_eq!(before.plugins["echo"], (4, BTreeSet::from([(4, sha256_of(&libraries.echo))])), "numbered as saved");
        assert_eq!(before.listeners.len(), 1, "{before:?}");
        client.start_listener("echo", &[("note", "from-api")]).await;
        let (before, _) = observe(&mut client).await;
        drop(daemon);

        let daemon = Daemon::start_with(options);
        let mut client = daemon.client().await;
        let (after, _) = observe(&mut client).await;
        assert_eq!(after, before, "{}", daemon.log());
        assert!(!daemon.log().contains("moved aside"), "{}", daemon.log());
        for (address, ..) in &after.listeners {
            let _ = asyncore_tests::connect(address.parse().unwrap());
        }
    });
}

/// A state that gives one generation number twice restores the first and
/// reports the second.
#[test]
fn a_generation_number_given_twice_is_reported() {
    runtime().block_on(async {
        let libraries = Libraries::new();
        let state_dir = TempDir::new("state-twice");
        std::fs::write(state_dir.path().join("state.json"), state_naming_echo(&libraries, &[2, 2])).unwrap();
        let daemon = start(state_dir.path());
        eventually!(async || daemon.log().contains("moved aside"), "the state moved aside:\n{}", daemon.log()).await;
        assert!(daemon.log().contains("plugin echo already has generation 2"), "{}", daemon.log());
        let mut client = daemon.client().await;
        let (restored, _) = observe(&mut client).await;
        assert_eq!(restored.plugins["echo"], (2, BTreeSet::from([(2, sha256_of(&libraries.echo))])));
        assert_eq!(moved_aside(state_dir.path()).len(), 1);
    });
}

/// Changes made over the HTTP API are saved as those made over gRPC are
/// (in-process: the HTTP API goes through the same calls).
#[test]
fn changes_made_over_http_are_saved_too() {
    runtime().block_on(async {
        let libraries = Libraries::new();
        let state_dir = TempDir::new("state-http");
        let options = Options {
            plugins: Vec::new(),
            config: format!("state_dir = {:?}\nallow_any_plugin_path = true\n", state_dir.path().display().to_string()),
            ..Options::default()
        };
        let daemon = InProcessDaemon::start_with(options.clone()).await;
        let http = Http::of(&daemon);
        http.post("/v1/plugins", json!({ "path": libraries.echo.display().to_string(), "activate": true })).await.ok();
        let request = json!({ "address": "127.0.0.1:0", "plugin": "echo", "config": { "note": "http" } });
        let address = http.post("/v1/listeners", request).await.ok()["address"].as_str().unwrap().to_string();
        drop(daemon);

        let daemon = InProcessDaemon::start_with(options).await;
        let mut client = daemon.client().await;
        let (restored, _) = observe(&mut client).await;
        let config = BTreeMap::from([("note".to_string(), "http".to_string())]);
        assert_eq!(restored.listeners, vec![(address.clone(), "echo".to_string(), config, false)]);
        assert_eq!(restored.plugins["echo"], (1, BTreeSet::from([(1, sha256_of(&libraries.echo))])));
        let _ = asyncore_tests::connect(address.parse().unwrap());
    });
}

/// The daemon-wide limit set with `SetDaemonLimits` is saved and comes
/// back after a restart; once the config file's `max_connections` is
/// edited, the file's applies.
#[test]
fn the_daemons_connection_limit_comes_back_unless_the_config_changed_it() {
    runtime().block_on(async {
        let state_dir = TempDir::new("state-limits");
        let options = |configured: u64| Options {
            plugins: Vec::new(),
            config: format!(
                "state_dir = {:?}\nmax_connections = {configured}\n",
                state_dir.path().display().to_string()
            ),
            args: vec!["--allow-any-plugin-path"],
            ..Options::default()
        };
        let limit = async |daemon: &Daemon, set: Option<u64>| {
            let mut client = daemon.client().await;
            let request = v1::SetDaemonLimitsRequest { max_connections: set };
            client.listeners.set_daemon_limits(request).await.unwrap().into_inner().max_connections
        };
        let daemon = Daemon::start_with(options(100));
        assert_eq!(limit(&daemon, None).await, 100, "the config's");
        assert_eq!(limit(&daemon, Some(7)).await, 7);
        drop(daemon);

        let daemon = Daemon::start_with(options(100));
        assert_eq!(limit(&daemon, None).await, 7, "the saved one: {}", daemon.log());
        drop(daemon);

        let daemon = Daemon::start_with(options(50));
        assert_eq!(limit(&daemon, None).await, 50, "the edited config's: {}", daemon.log());
    });
}
