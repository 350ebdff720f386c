//! `plugins reload NAME --watch`: the edit-build-reload loop, and how it
//! tells a rebuilt library from one still being written.

use std::io;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use asyncore_proto::v1;
use asyncore_proto::v1::plugins_client::PluginsClient;

use super::{current_generation, current_of, find_plugin, generation_number, path_text, switch_summary};
use crate::connection::{
    Channel, ControlTarget, EXIT_UNREACHABLE, describe_error, exit_code, io_error_text,
    transport_failure_as_unreachable,
};
use crate::flags::{OutputFormat, ReloadArgs};
use crate::render::{plugin_json, print_json_line, print_text};

/// How often the library's metadata is looked at.
const WATCH_INTERVAL: Duration = Duration::from_millis(500);

/// `plugins reload NAME --watch`: the edit-build-reload loop. Polls the
/// library's metadata and, once a change has settled, hashes the file and
/// reloads if the content differs from the current generation's. A failed
/// reload is reported and the watch goes on; only an unreachable daemon or
/// Ctrl-C ends it.
pub(super) async fn watch_and_reload(
    client: &mut PluginsClient<Channel>,
    args: ReloadArgs,
    format: OutputFormat,
    target: &ControlTarget,
) -> anyhow::Result<()> {
    let path = match args.path {
        Some(path) => path,
        None => {
            let plugin = find_plugin(client, &args.name).await?;
            let current = current_of(&plugin).with_context(|| {
                format!("plugin {:?} has no current generation; activate one or pass --path", args.name)
            })?;
            PathBuf::from(&current.path)
        }
    };
    // Naming the file in every request, rather than letting the daemon take
    // the current generation's, keeps reloading the file being watched even
    // after someone activates a generation loaded from elsewhere.
    let path_in_request = path_text(&path)?;
    let drain_timeout_ms = args.drain_timeout.unwrap_or(0);
    eprintln!("watching {} for changes to {}; Ctrl-C to stop", path.display(), args.name);

    let watch = async {
        let mut ticks = tokio::time::interval(WATCH_INTERVAL);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut file_watch = FileWatch::default();
        let mut unreadable_reported = false;
        loop {
            ticks.tick().await;
            let stamp = match FileStamp::of(&path) {
                Ok(stamp) => {
                    unreadable_reported = false;
                    Some(stamp)
                }
                Err(error) => {
                    // Builds delete and recreate their output; say so once,
                    // not twice a second.
                    if !unreadable_reported {
                        eprintln!(
                            "asyncorectl: cannot read {}: {}; still watching",
                            path.display(),
                            io_error_text(&error)
                        );
                        unreadable_reported = true;
                    }
                    None
                }
            };
            if !file_watch.should_hash(stamp) {
                continue;
            }
            let sha256 = match file_sha256(&path) {
                Ok(sha256) => sha256,
                Err(error) => {
                    eprintln!("asyncorectl: cannot read {}: {}; still watching", path.display(), io_error_text(&error));
                    continue;
                }
            };
            let reloaded = reload_if_changed(client, &args.name, &path_in_request, &sha256, drain_timeout_ms).await;
            match reloaded.map_err(|error| transport_failure_as_unreachable(error, target)) {
                Ok(None) => {}
                Ok(Some((plugin, previous))) => match format {
                    OutputFormat::Json => print_json_line(&plugin_json(&plugin))?,
                    OutputFormat::Table => {
                        print_text(&format!("{}\n", switch_summary(&plugin.name, plugin.current_generation, previous)))?
                    }
                },
                Err(error) if exit_code(&error) == EXIT_UNREACHABLE => return Err(error),
                Err(error) => eprintln!("asyncorectl: {}", describe_error(&error)),
            }
        }
    };

    // Ctrl-C is the normal way to stop watching, so it ends with success.
    tokio::select! {
        signal = tokio::signal::ctrl_c() => signal.context("cannot listen for Ctrl-C"),
        result = watch => result,
    }
}

/// Reloads plugin `name` from `path` unless its current generation already
/// has content `sha256`. Returns the plugin after the reload and the
/// generation that was current before it (0 for none).
///
/// The current generation is asked for each time rather than remembered, so
/// that a reload or rollback by someone else is taken into account.
async fn reload_if_changed(
    client: &mut PluginsClient<Channel>,
    name: &str,
    path: &str,
    sha256: &str,
    drain_timeout_ms: u64,
) -> anyhow::Result<Option<(v1::Plugin, u32)>> {
    let current = current_generation(client, name).await?;
    if current.as_ref().is_some_and(|current| current.sha256 == sha256) {
        return Ok(None);
    }
    let request = v1::ReloadPluginRequest { name: name.to_owned(), path: path.to_owned(), drain_timeout_ms };
    let plugin = client.reload_plugin(request).await?.into_inner();
    Ok(Some((plugin, generation_number(current.as_ref()))))
}

/// What identifies one version of the watched file without reading it.
/// Besides mtime and size, the inode catches a same-size replacement by
/// rename within the file system's mtime granularity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    device: u64,
    inode: u64,
}

impl FileStamp {
    fn of(path: &Path) -> io::Result<FileStamp> {
        let metadata = std::fs::metadata(path)?;
        Ok(FileStamp {
            modified: metadata.modified().ok(),
            len: metadata.len(),
            device: metadata.dev(),
            inode: metadata.ino(),
        })
    }
}

/// Decides when the watched file is worth hashing: once it has changed and
/// then stayed the same for a whole poll. A linker writes its output in
/// place over many writes, and a half-written library must never reach the
/// daemon's `dlopen`.
#[derive(Debug, Default)]
struct FileWatch {
    /// The stamp at the previous poll (`None`: missing or not polled yet).
    seen: Option<FileStamp>,
    /// The stamp of the last version hashed.
    hashed: Option<FileStamp>,
}

impl FileWatch {
    fn should_hash(&mut self, stamp: Option<FileStamp>) -> bool {
        let settled = stamp.is_some() && stamp == self.seen;
        self.seen = stamp;
        if settled && stamp != self.hashed {
            self.hashed = stamp;
            return true;
        }
        false
    }
}

/// SHA-256 of a file, lower-case hex: what `ListPlugins` reports for the
/// library a generation was loaded from.
fn file_sha256(path: &Path) -> io::Result<String> {
    use sha2::{Digest as _, Sha256};
    let digest = Sha256::digest(std::fs::read(path)?);
    Ok(digest.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_watch_hashes_once_per_settled_change() {
        let stamp = |len| Some(FileStamp { modified: None, len, device: 1, inode: 7 });
        let mut watch = FileWatch::default();
        // The first sighting only starts the clock; the next poll hashes.
        assert!(!watch.should_hash(stamp(10)));
        assert!(watch.should_hash(stamp(10)));
        assert!(!watch.should_hash(stamp(10)));
        // A file still being written is left alone until it stops changing.
        assert!(!watch.should_hash(stamp(20)));
        assert!(!watch.should_hash(stamp(30)));
        assert!(watch.should_hash(stamp(30)));
        // Gone, then back as it was: nothing new to hash.
        assert!(!watch.should_hash(None));
        assert!(!watch.should_hash(stamp(30)));
        assert!(!watch.should_hash(stamp(30)));
        // Back different.
        assert!(!watch.should_hash(None));
        assert!(!watch.should_hash(stamp(40)));
        assert!(watch.should_hash(stamp(40)));
    }
}
