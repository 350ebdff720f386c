//! `--watch`: reloads a plugin when its library in a plugin directory
//! changes, for the edit-build-reload loop.
//!
//! Polls every 500 ms: the file's size and mtime first, the SHA-256 only when
//! those moved, and reloads only when the content differs from the current
//! generation's. A build writes the file in several steps, so a change is
//! acted on once it has been stable for one poll. Polling needs no inotify
//! and sees a file replaced by rename just as well.

use std::{collections::HashMap, path::PathBuf, time::Duration};

use tracing::{info, warn};

use asyncore_engine::{
    command::{Command, EngineHandle},
    plugin_host::{self, PluginPolicy},
};

const POLL: Duration = Duration::from_millis(500);

/// What was last seen of a plugin's file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    len: u64,
    modified: Option<std::time::SystemTime>,
}

/// Runs until the engine goes away.
pub(crate) async fn watch_plugins(engine: EngineHandle, policy: PluginPolicy) {
    let mut seen: HashMap<String, Seen> = HashMap::new();
    let mut ticker = tokio::time::interval(POLL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Ok(plugins) = engine.request(|reply| Command::ListPlugins { reply }).await else { return };
        for plugin in plugins {
            if plugin.current_generation == 0 {
                continue;
            }
            let current = plugin.headline();
            let path = PathBuf::from(&current.path);
            if policy.check(&path).is_err() {
                continue;
            }
            let Ok(meta) = std::fs::metadata(&path) else { continue };
            let now = Seen { len: meta.len(), modified: meta.modified().ok() };
            let changed = seen.insert(plugin.name.clone(), now.clone()).is_some_and(|before| before != now);
            if changed {
                // Still being written: wait for one quiet poll.
                continue;
            }
            let Ok(sha256) = plugin_host::file_sha256(&path) else { continue };
            if sha256 == current.sha256 {
                continue;
            }
            info!(plugin = %plugin.name, path = %path.display(), "watch: library changed; reloading");
            let result = engine.load_plugin(path.clone(), Some(&plugin.name), true, None).await;
            if let Err(e) = result {
                // Reloading the same bytes again would fail again: remember
                // them as seen until the file changes once more.
                warn!(plugin = %plugin.name, "watch: reload failed, keeping the current generation: {e}");
                wait_for_change(&path, &mut seen, &plugin.name).await;
            }
        }
    }
}

/// After a failed reload, waits until the file changes again.
async fn wait_for_change(path: &std::path::Path, seen: &mut HashMap<String, Seen>, name: &str) {
    let Ok(failed) = plugin_host::file_sha256(path) else { return };
    loop {
        tokio::time::sleep(POLL).await;
        match plugin_host::file_sha256(path) {
            Ok(sha256) if sha256 == failed => {}
            _ => {
                seen.remove(name);
                return;
            }
        }
    }
}
