//! `--watch`: reloads a plugin when its library in a plugin directory
//! changes, for the edit-build-reload loop.
//!
//! Polls every 500 ms. Each poll reads only the size and mtime (the stamp)
//! of every current library; a library is hashed (SHA-256) once when first
//! seen, and after that only when its stamp moved and then stayed the same
//! for one poll: a build writes the file in several steps, so a change is
//! acted on once it is quiet. Quiet is not enough (a linker can pause
//! mid-file for longer than a poll): the file must also be a complete ELF
//! library (its headers, segments and sections all within the file, the
//! check the loader makes before `dlopen`), else it is left alone until its
//! stamp moves again. New content is reloaded once two polls running found
//! the same stamp and the same hash (so a writer that rewrites bytes in
//! place without moving the stamp is waited for too), and only when it
//! differs from the current generation's. Polling needs no inotify and sees
//! a file replaced by rename just as well.
//!
//! Each plugin is tracked on its own: a reload that fails is remembered by
//! the content's hash (the same bytes would fail again) while every other
//! plugin is still watched. The decisions live in [`Watched`], a small state
//! machine fed with observations, so they are tested without files or
//! sleeps; the file work runs on tokio's blocking threads.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use tracing::{info, warn};

use asyncore_engine::{
    command::{Command, EngineHandle, LoadPlugin},
    plugin_host::{self, PluginLoadError, PluginPolicy},
};

const POLL: Duration = Duration::from_millis(500);

/// What a poll sees of a library without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: Option<SystemTime>,
}

/// What to do after an observation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// Nothing to do this poll.
    Wait,
    /// The file is quiet and its content is not known: hash it and report
    /// with [`Watched::hashed`].
    Hash,
}

/// What the watcher knows of one plugin's library.
#[derive(Debug, Default)]
struct Watched {
    /// The stamp of the previous poll.
    stamp: Option<Stamp>,
    /// The content may differ from what was last hashed: set when the
    /// plugin is first seen and whenever the stamp moves.
    unhashed: bool,
    /// New content hashed at the previous poll: reloaded if the next poll
    /// finds the same stamp and the same hash.
    candidate: Option<String>,
    /// The content whose reload failed; not tried again.
    failed_sha256: Option<String>,
}

impl Watched {
    /// Takes this poll's stamp of the file.
    fn observe(&mut self, stamp: Stamp) -> Next {
        let moved = self.stamp.is_none_or(|before| before != stamp);
        self.stamp = Some(stamp);
        if moved {
            // First seen, or still being written: wait for one quiet poll.
            self.unhashed = true;
            self.candidate = None;
            Next::Wait
        } else if self.unhashed {
            Next::Hash
        } else {
            Next::Wait
        }
    }

    /// Takes the hash of the quiet file and the current generation's;
    /// returns whether to reload: new content, not failed before, that the
    /// previous poll hashed the same.
    fn hashed(&mut self, sha256: &str, current_sha256: &str) -> bool {
        if sha256 == current_sha256 {
            // Back to the running content (or it never changed).
            self.unhashed = false;
            self.candidate = None;
            self.failed_sha256 = None;
            return false;
        }
        if self.candidate.as_deref() != Some(sha256) {
            // Hash it again at the next poll.
            self.candidate = Some(sha256.to_owned());
            return false;
        }
        self.unhashed = false;
        self.candidate = None;
        self.failed_sha256.as_deref() != Some(sha256)
    }

    /// The quiet file is not a complete library (still being written, or
    /// broken): nothing to do until its stamp moves again.
    fn incomplete(&mut self) {
        self.unhashed = false;
        self.candidate = None;
    }

    /// Records how the reload of content `sha256` went.
    fn reloaded(&mut self, sha256: &str, ok: bool) {
        self.failed_sha256 = (!ok).then(|| sha256.to_string());
    }
}

/// A current library, as the engine reports it.
#[derive(Debug)]
struct Library {
    plugin: String,
    path: PathBuf,
    sha256: String,
}

/// Runs until the engine goes away.
pub(crate) async fn watch_plugins(engine: EngineHandle, policy: PluginPolicy) {
    let mut watched: HashMap<String, Watched> = HashMap::new();
    let mut ticker = tokio::time::interval(POLL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Ok(plugins) = engine.request(|reply| Command::ListPlugins { reply }).await else { return };
        let libraries: Vec<Library> = plugins
            .iter()
            .filter(|plugin| plugin.current_generation != 0)
            .map(|plugin| {
                let current = plugin.headline();
                Library {
                    plugin: plugin.name.clone(),
                    path: PathBuf::from(&current.path),
                    sha256: current.sha256.clone(),
                }
            })
            .collect();
        watched.retain(|name, _| libraries.iter().any(|library| library.plugin == *name));

        let paths: Vec<PathBuf> = libraries.iter().map(|library| library.path.clone()).collect();
        let policy = policy.clone();
        let Ok(stamps) = tokio::task::spawn_blocking(move || {
            paths.iter().map(|path| stamp(&policy, path)).collect::<Vec<Option<Stamp>>>()
        })
        .await
        else {
            return;
        };

        for (library, stamp) in libraries.into_iter().zip(stamps) {
            // Missing (mid-rename) or outside the plugin directories.
            let Some(stamp) = stamp else { continue };
            let state = watched.entry(library.plugin.clone()).or_default();
            if state.observe(stamp) != Next::Hash {
                continue;
            }
            let path = library.path.clone();
            let Ok(checked) = tokio::task::spawn_blocking(move || {
                plugin_host::check_library(&path)?;
                plugin_host::file_sha256(&path).map_err(|source| PluginLoadError::Io { path, source })
            })
            .await
            else {
                continue;
            };
            let sha256 = match checked {
                Ok(sha256) => sha256,
                // Still being written, or broken: not loaded, and not
                // looked at again until it changes.
                Err(e @ PluginLoadError::NotALibrary { .. }) => {
                    warn!(
                        plugin = %library.plugin,
                        "watch: reload failed, keeping the current generation: {e}; waiting for the file to change"
                    );
                    state.incomplete();
                    continue;
                }
                // Unreadable now: the next poll tries again.
                Err(_) => continue,
            };
            if !state.hashed(&sha256, &library.sha256) {
                continue;
            }
            info!(plugin = %library.plugin, path = %library.path.display(), "watch: library changed; reloading");
            let request = LoadPlugin {
                path: library.path.clone(),
                expected_name: Some(library.plugin.clone()),
                activate: true,
                ..LoadPlugin::default()
            };
            let result = engine.load_plugin(request).await;
            if let Err(e) = &result {
                warn!(plugin = %library.plugin, "watch: reload failed, keeping the current generation: {e}");
            }
            state.reloaded(&sha256, result.is_ok());
        }
    }
}

/// The stamp of a library the policy allows, or `None`.
fn stamp(policy: &PluginPolicy, path: &Path) -> Option<Stamp> {
    policy.check(path).ok()?;
    let meta = std::fs::metadata(path).ok()?;
    Some(Stamp { len: meta.len(), modified: meta.modified().ok() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(len: u64) -> Stamp {
        Stamp { len, modified: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(len)) }
    }

    /// A watch whose file (stamp 1) was hashed and found to be the running
    /// content, `a`.
    fn settled_on_running_content() -> Watched {
        let mut watched = Watched::default();
        watched.observe(stamp(1));
        watched.observe(stamp(1));
        assert!(!watched.hashed("a", "a"));
        watched
    }

    #[test]
    fn a_stable_file_is_hashed_once_not_on_every_poll() {
        let mut watched = Watched::default();
        assert_eq!(watched.observe(stamp(1)), Next::Wait, "first seen: wait for a quiet poll");
        assert_eq!(watched.observe(stamp(1)), Next::Hash);
        assert!(!watched.hashed("a", "a"), "the running content");
        for _ in 0..10 {
            assert_eq!(watched.observe(stamp(1)), Next::Wait, "nothing moved: no hashing");
        }
    }

    #[test]
    fn a_change_is_hashed_once_it_stayed_quiet_for_a_poll() {
        let mut watched = settled_on_running_content();
        // Written in three steps: nothing until the stamp holds still.
        assert_eq!(watched.observe(stamp(2)), Next::Wait);
        assert_eq!(watched.observe(stamp(3)), Next::Wait);
        assert_eq!(watched.observe(stamp(4)), Next::Wait);
        assert_eq!(watched.observe(stamp(4)), Next::Hash);
        assert!(!watched.hashed("b", "a"), "new content: confirmed at the next poll first");
        assert_eq!(watched.observe(stamp(4)), Next::Hash);
        assert!(watched.hashed("b", "a"), "the same content two polls running: reload");
        watched.reloaded("b", true);
        assert_eq!(watched.observe(stamp(4)), Next::Wait);
    }

    #[test]
    fn content_rewritten_under_a_still_stamp_is_reloaded_only_once_it_hashes_the_same_twice() {
        let mut watched = settled_on_running_content();
        watched.observe(stamp(2));
        // Bytes rewritten in place between two polls, the stamp unmoved.
        assert_eq!(watched.observe(stamp(2)), Next::Hash);
        assert!(!watched.hashed("half", "a"));
        assert_eq!(watched.observe(stamp(2)), Next::Hash);
        assert!(!watched.hashed("whole", "a"), "another hash: not yet");
        assert_eq!(watched.observe(stamp(2)), Next::Hash);
        assert!(watched.hashed("whole", "a"));
    }

    #[test]
    fn a_touched_file_with_the_running_content_is_not_reloaded() {
        let mut watched = settled_on_running_content();
        watched.observe(stamp(2));
        assert_eq!(watched.observe(stamp(2)), Next::Hash);
        assert!(!watched.hashed("a", "a"));
    }

    #[test]
    fn failed_content_is_not_retried_but_the_next_build_is() {
        let mut watched = Watched::default();
        watched.observe(stamp(1));
        watched.observe(stamp(1));
        assert!(!watched.hashed("broken", "a"));
        watched.observe(stamp(1));
        assert!(watched.hashed("broken", "a"));
        watched.reloaded("broken", false);
        // The same bytes again (say, touched): not retried.
        watched.observe(stamp(2));
        for _ in 0..2 {
            assert_eq!(watched.observe(stamp(2)), Next::Hash);
            assert!(!watched.hashed("broken", "a"));
        }
        assert_eq!(watched.observe(stamp(2)), Next::Wait, "settled: not hashed again");
        // A new build is.
        watched.observe(stamp(3));
        assert_eq!(watched.observe(stamp(3)), Next::Hash);
        assert!(!watched.hashed("fixed", "a"));
        assert_eq!(watched.observe(stamp(3)), Next::Hash);
        assert!(watched.hashed("fixed", "a"));
        watched.reloaded("fixed", true);
        assert_eq!(watched.failed_sha256, None);
    }

    #[test]
    fn a_quiet_but_incomplete_file_waits_for_its_next_change() {
        let mut watched = settled_on_running_content();
        // Half written, and the writer paused for longer than a poll.
        watched.observe(stamp(2));
        assert_eq!(watched.observe(stamp(2)), Next::Hash);
        watched.incomplete();
        for _ in 0..5 {
            assert_eq!(watched.observe(stamp(2)), Next::Wait, "not checked again until it changes");
        }
        // The rest written.
        watched.observe(stamp(3));
        assert_eq!(watched.observe(stamp(3)), Next::Hash);
        assert!(!watched.hashed("b", "a"));
        assert_eq!(watched.observe(stamp(3)), Next::Hash);
        assert!(watched.hashed("b", "a"));
    }

    #[test]
    fn a_file_seen_changed_at_start_is_reloaded() {
        // Rebuilt between the load and the watcher's first poll.
        let mut watched = Watched::default();
        assert_eq!(watched.observe(stamp(1)), Next::Wait);
        assert_eq!(watched.observe(stamp(1)), Next::Hash);
        assert!(!watched.hashed("b", "a"));
        assert_eq!(watched.observe(stamp(1)), Next::Hash);
        assert!(watched.hashed("b", "a"));
    }
}
