//! Metrics a plugin defines: counters and gauges that the daemon exports
//! (in `/metrics` with `plugin` and `generation` labels, and in
//! `ListPlugins`), for what only the plugin knows (a cache's hits and
//! misses, an HTTP server's responses by status).
//!
//! Define them once, in [`Plugin::listen`](crate::Plugin::listen) or
//! lazily, and keep the handle: it is a small `Copy` value. Updating one is
//! a relaxed atomic add in the daemon, cheap enough for every request.
//!
//! ```no_run
//! use asyncore_sdk::metrics::Counter;
//!
//! let hits = Counter::new("cache_hits_total", "Gets that found their key.");
//! hits.inc();
//! ```
//!
//! Names follow Prometheus's rule (`[a-zA-Z_:][a-zA-Z0-9_:]*`, at most 128
//! bytes); defining a name again returns the same metric (`listen` runs
//! once per listener). Help text past 1 KiB is cut. A daemon older than
//! ABI 1.3, a bad name, more than 64 metrics or no daemon at all (a
//! plugin's own unit tests) give a handle that counts nothing: a metric
//! never breaks the plugin.

use crate::{
    export::{has_host, host_opt, with_host_data},
    ffi::{StrRef, metric_kind},
};

/// A value that only goes up.
#[derive(Debug, Clone, Copy)]
pub struct Counter {
    id: Option<u64>,
}

/// A value that goes up and down.
#[derive(Debug, Clone, Copy)]
pub struct Gauge {
    id: Option<u64>,
}

fn define(kind: u32, name: &str, help: &str) -> Option<u64> {
    // Outside a host (a plugin's own unit tests) a metric counts nothing.
    if !has_host() {
        return None;
    }
    let metric_define = host_opt!(metric_define)?;
    let id = with_host_data(|data| {
        // SAFETY: data is the host's own for this plugin; the strings are
        // lent for the call and copied by the host.
        unsafe { metric_define(data, kind, StrRef::new(name), StrRef::new(help)) }
    })?;
    u64::try_from(id).ok()
}

fn add(id: Option<u64>, delta: i64) {
    // A handle of a metric that was defined was defined in a host.
    if let Some(id) = id
        && let Some(metric_add) = host_opt!(metric_add)
    {
        // SAFETY: data is the host's own; the id came from metric_define.
        with_host_data(|data| unsafe { metric_add(data, id, delta) });
    }
}

impl Counter {
    /// Defines (or finds) the counter `name`.
    pub fn new(name: &str, help: &str) -> Counter {
        Counter { id: define(metric_kind::COUNTER, name, help) }
    }

    /// Adds one.
    pub fn inc(&self) {
        add(self.id, 1);
    }

    /// Adds `n`.
    pub fn add(&self, n: u64) {
        add(self.id, i64::try_from(n).unwrap_or(i64::MAX));
    }
}

impl Gauge {
    /// Defines (or finds) the gauge `name`.
    pub fn new(name: &str, help: &str) -> Gauge {
        Gauge { id: define(metric_kind::GAUGE, name, help) }
    }

    /// Sets the value.
    pub fn set(&self, value: i64) {
        if let Some(id) = self.id
            && let Some(metric_set) = host_opt!(metric_set)
        {
            // SAFETY: data is the host's own; the id came from metric_define.
            with_host_data(|data| unsafe { metric_set(data, id, value) });
        }
    }

    /// Adds `delta` (which may be negative).
    pub fn add(&self, delta: i64) {
        add(self.id, delta);
    }
}

#[cfg(test)]
mod tests {
    use super::{Counter, Gauge};

    #[test]
    fn metrics_outside_a_daemon_count_nothing_and_never_panic() {
        let hits = Counter::new("hits_total", "Hits.");
        hits.inc();
        hits.add(u64::MAX);
        let open = Gauge::new("open", "Open things.");
        open.set(3);
        open.add(-1);
        assert!(hits.id.is_none() && open.id.is_none());
    }
}
