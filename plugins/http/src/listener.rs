//! What the connections of one listener share: the site, the settings, the
//! counters of what was refused, and the open connections per peer
//! address that `max_connections_per_ip` limits.
//!
//! Everything runs on the poll loop's one thread, so the listening
//! dispatcher and its connections share it through an `Rc`, with `Cell`s
//! and a `RefCell` for what changes.

use std::{
    cell::{Cell, RefCell},
    collections::HashMap,
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    rc::Rc,
    time::{Duration, Instant},
};

use asyncore_sdk::metrics::Counter;

use crate::{
    config::Settings,
    request::RequestHead,
    response::{Body, Status},
    site::{Answer, Site, origin_path},
};

/// The statuses a request is refused with, in the order the status page
/// lists them.
const REFUSALS: [Status; 7] = [
    Status::BadRequest,
    Status::RequestTimeout,
    Status::LengthRequired,
    Status::UriTooLong,
    Status::HeaderFieldsTooLarge,
    Status::NotImplemented,
    Status::VersionNotSupported,
];

/// Refusal lines a listener logs per second at most: a flood of refused
/// clients must not flood the daemon's log. The lines left out are counted
/// and said in the next line logged (the metrics count every refusal).
const REFUSAL_LINES_PER_SECOND: u32 = 50;

/// The status page's type: Prometheus' text format, which is also
/// readable as it is.
const STATUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// One listener's shared state.
#[derive(Debug)]
pub(crate) struct Listener {
    pub(crate) site: Site,
    pub(crate) settings: Settings,
    pub(crate) counters: Counters,
    /// Open connections per peer address, kept only under a
    /// `max_connections_per_ip`. Addresses leave at their last close, so it
    /// holds no more entries than there are connections.
    per_ip: RefCell<HashMap<IpAddr, usize>>,
    /// What limits the refusal lines.
    pub(crate) refusal_lines: LogBudget,
}

/// At most [`REFUSAL_LINES_PER_SECOND`] lines in any one-second window.
#[derive(Debug, Default)]
pub(crate) struct LogBudget {
    window: Cell<Option<Instant>>,
    logged: Cell<u32>,
    left_out: Cell<u64>,
}

impl LogBudget {
    /// Whether a line may be logged at `now`: if so, how many were left
    /// out since the last one logged (counted as left out otherwise).
    pub(crate) fn take(&self, now: Instant) -> Option<u64> {
        if self.window.get().is_none_or(|start| now.saturating_duration_since(start) >= Duration::from_secs(1)) {
            self.window.set(Some(now));
            self.logged.set(0);
        }
        if self.logged.get() >= REFUSAL_LINES_PER_SECOND {
            self.left_out.set(self.left_out.get() + 1);
            return None;
        }
        self.logged.set(self.logged.get() + 1);
        Some(self.left_out.take())
    }
}

/// The end of a line logged after others were left out.
pub(crate) fn left_out_note(left_out: u64) -> String {
    match left_out {
        0 => String::new(),
        n => format!(" ({n} similar lines left out before this one: at most {REFUSAL_LINES_PER_SECOND} a second)"),
    }
}

/// What a listener counts since it started. Read on the status page.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    accepted: Cell<u64>,
    open: Cell<u64>,
    /// Connections refused by `max_connections_per_ip`.
    refused_per_ip: Cell<u64>,
    /// Requests refused, by status, in the order of [`REFUSALS`].
    refused: [Cell<u64>; REFUSALS.len()],
    /// Kept-alive connections closed by `keepalive_timeout`.
    keepalive_closed: Cell<u64>,
    /// The plugin metrics the daemon exports (`http_responses_200_total`,
    /// ..., `http_connections_refused_per_ip_total`,
    /// `http_keepalive_closed_total`): each defined when first counted,
    /// then one atomic add each.
    metrics: RefCell<Vec<(Metric, Counter)>>,
}

/// A metric the plugin exports, found without building its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Metric {
    Responses(u16),
    KeepaliveClosed,
    RefusedPerIp,
}

impl Metric {
    fn name_and_help(self) -> (String, String) {
        match self {
            Metric::Responses(code) => {
                (format!("http_responses_{code}_total"), format!("Responses with status {code}."))
            }
            Metric::KeepaliveClosed => {
                ("http_keepalive_closed_total".into(), "Kept-alive connections closed by keepalive_timeout.".into())
            }
            Metric::RefusedPerIp => (
                "http_connections_refused_per_ip_total".into(),
                "Connections refused by max_connections_per_ip.".into(),
            ),
        }
    }
}

impl Counters {
    /// Counts a request refused with `status`; answers how many were so
    /// far, this one included.
    pub(crate) fn refused(&self, status: Status) -> u64 {
        let Some(index) = REFUSALS.iter().position(|&s| s == status) else { return 0 };
        let n = self.refused[index].get() + 1;
        self.refused[index].set(n);
        n
    }

    /// Counts a response with `status` in the daemon's metrics.
    pub(crate) fn responded(&self, status: Status) {
        self.export(Metric::Responses(status.code()));
    }

    /// Counts a kept-alive connection closed for idling.
    pub(crate) fn keepalive_closed(&self) {
        self.keepalive_closed.set(self.keepalive_closed.get() + 1);
        self.export(Metric::KeepaliveClosed);
    }

    /// Counts a connection refused by `max_connections_per_ip`.
    fn refused_per_ip(&self) -> u64 {
        let n = self.refused_per_ip.get() + 1;
        self.refused_per_ip.set(n);
        self.export(Metric::RefusedPerIp);
        n
    }

    /// Adds one to the daemon's `metric`, defined the first time.
    fn export(&self, metric: Metric) {
        let mut metrics = self.metrics.borrow_mut();
        let counter = match metrics.iter().find(|(known, _)| *known == metric) {
            Some((_, counter)) => *counter,
            None => {
                let (name, help) = metric.name_and_help();
                let counter = Counter::new(&name, &help);
                metrics.push((metric, counter));
                counter
            }
        };
        counter.inc();
    }

    /// The counters in Prometheus' text exposition format.
    pub(crate) fn render(&self) -> String {
        let mut text = String::new();
        let mut metric = |name: &str, kind: &str, samples: &[(&str, u64)]| {
            let _ = writeln!(text, "# TYPE asyncored_http_{name} {kind}");
            for (labels, value) in samples {
                let _ = writeln!(text, "asyncored_http_{name}{labels} {value}");
            }
        };
        metric("connections_accepted_total", "counter", &[("", self.accepted.get())]);
        metric("connections_open", "gauge", &[("", self.open.get())]);
        let per_ip = "{reason=\"max_connections_per_ip\"}";
        metric("connections_refused_total", "counter", &[(per_ip, self.refused_per_ip.get())]);
        let labels: Vec<String> = REFUSALS.iter().map(|status| format!("{{status=\"{}\"}}", status.code())).collect();
        let samples: Vec<(&str, u64)> =
            labels.iter().zip(&self.refused).map(|(labels, n)| (labels.as_str(), n.get())).collect();
        metric("requests_refused_total", "counter", &samples);
        metric("keepalive_closed_total", "counter", &[("", self.keepalive_closed.get())]);
        text
    }
}

/// A connection counted as open (and against its address's limit) until
/// it is dropped with its dispatcher.
#[derive(Debug)]
pub(crate) struct Admission {
    listener: Rc<Listener>,
    /// The address counted in `per_ip`, if any.
    ip: Option<IpAddr>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        let counters = &self.listener.counters;
        counters.open.set(counters.open.get() - 1);
        if let Some(ip) = self.ip {
            let mut per_ip = self.listener.per_ip.borrow_mut();
            if let Some(n) = per_ip.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    per_ip.remove(&ip);
                }
            }
        }
    }
}

/// A connection refused by `max_connections_per_ip`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct TooManyFromIp {
    pub(crate) ip: IpAddr,
    pub(crate) open: usize,
    pub(crate) refused_so_far: u64,
}

impl Listener {
    pub(crate) fn new(site: Site, settings: Settings) -> Listener {
        Listener {
            site,
            settings,
            counters: Counters::default(),
            per_ip: RefCell::new(HashMap::new()),
            refusal_lines: LogBudget::default(),
        }
    }

    /// Admits a connection from `peer`, or refuses it when its address
    /// already has `max_connections_per_ip` connections open.
    ///
    /// # Errors
    ///
    /// The address and its count, when refused.
    pub(crate) fn admit(self: &Rc<Listener>, peer: Option<SocketAddr>) -> Result<Admission, TooManyFromIp> {
        // An IPv4 client of a dual-stack listener is one address whichever
        // way it comes.
        let ip = peer.map(|peer| peer.ip().to_canonical());
        let counted = match (self.settings.max_connections_per_ip, ip) {
            (Some(limit), Some(ip)) => {
                let mut per_ip = self.per_ip.borrow_mut();
                let open = per_ip.entry(ip).or_insert(0);
                if *open >= limit {
                    let refused_so_far = self.counters.refused_per_ip();
                    return Err(TooManyFromIp { ip, open: *open, refused_so_far });
                }
                *open += 1;
                Some(ip)
            }
            _ => None,
        };
        let counters = &self.counters;
        counters.accepted.set(counters.accepted.get() + 1);
        counters.open.set(counters.open.get() + 1);
        Ok(Admission { listener: self.clone(), ip: counted })
    }

    /// Answers a complete request head: the status page at `status_path`,
    /// the site everywhere else.
    pub(crate) fn answer(&self, head: &RequestHead) -> Answer {
        let is_status =
            self.settings.status_path.as_deref().is_some_and(|path| origin_path(&head.line.target) == Some(path));
        if !is_status {
            return self.site.answer(head);
        }
        if !matches!(head.line.method.as_str(), "GET" | "HEAD") {
            return Answer::error(Status::MethodNotAllowed);
        }
        let body = Body::Owned(self.counters.render().into_bytes());
        Answer { status: Status::Ok, content_type: STATUS_CONTENT_TYPE, body }
    }
}

#[cfg(test)]
mod tests {
    use asyncore_sdk::Config;

    use super::*;

    fn listener(pairs: &[(&str, &str)]) -> Rc<Listener> {
        let settings = Settings::from_config(&Config::from_pairs(pairs.iter().copied())).unwrap();
        Rc::new(Listener::new(Site::new(None).unwrap(), settings))
    }

    fn peer(text: &str) -> Option<SocketAddr> {
        Some(text.parse().unwrap())
    }

    fn line(text: &str, name: &str) -> bool {
        text.lines().any(|line| line == name)
    }

    #[test]
    fn the_per_ip_limit_counts_open_connections_per_address() {
        let listener = listener(&[("max_connections_per_ip", "2")]);
        let a1 = listener.admit(peer("10.0.0.1:1000")).unwrap();
        let a2 = listener.admit(peer("10.0.0.1:1001")).unwrap();
        let refused = listener.admit(peer("10.0.0.1:1002")).unwrap_err();
        assert_eq!(refused, TooManyFromIp { ip: "10.0.0.1".parse().unwrap(), open: 2, refused_so_far: 1 });
        // The same address mapped into IPv6 is the same client.
        assert!(listener.admit(peer("[::ffff:10.0.0.1]:1003")).is_err());
        // Another address has a budget of its own.
        let b = listener.admit(peer("10.0.0.2:1000")).unwrap();
        drop(a1);
        let a3 = listener.admit(peer("10.0.0.1:1004")).unwrap();
        drop((a2, a3, b));
        assert!(listener.per_ip.borrow().is_empty(), "addresses leave with their last connection");
        let text = listener.counters.render();
        assert!(line(&text, "asyncored_http_connections_accepted_total 4"), "{text}");
        assert!(line(&text, "asyncored_http_connections_open 0"), "{text}");
        assert!(line(&text, "asyncored_http_connections_refused_total{reason=\"max_connections_per_ip\"} 2"), "{text}");
    }

    #[test]
    fn without_a_limit_nothing_is_kept_per_address() {
        let listener = listener(&[]);
        let admitted: Vec<_> = (0..100).map(|_| listener.admit(peer("10.0.0.1:1000")).unwrap()).collect();
        assert!(listener.per_ip.borrow().is_empty());
        assert!(line(&listener.counters.render(), "asyncored_http_connections_open 100"));
        drop(admitted);
        assert!(line(&listener.counters.render(), "asyncored_http_connections_open 0"));
    }

    #[test]
    fn refusal_lines_are_limited_per_second_and_the_next_says_how_many_were_left_out() {
        let budget = LogBudget::default();
        let start = Instant::now();
        for _ in 0..REFUSAL_LINES_PER_SECOND {
            assert_eq!(budget.take(start), Some(0));
        }
        assert_eq!(budget.take(start + Duration::from_millis(500)), None);
        assert_eq!(budget.take(start + Duration::from_millis(999)), None);
        assert_eq!(budget.take(start + Duration::from_secs(1)), Some(2), "a new second");
        assert_eq!(budget.take(start + Duration::from_secs(1)), Some(0));
        assert_eq!(left_out_note(0), "");
        assert_eq!(left_out_note(2), " (2 similar lines left out before this one: at most 50 a second)");
    }

    #[test]
    fn refusals_are_counted_by_status() {
        let counters = Counters::default();
        assert_eq!(counters.refused(Status::HeaderFieldsTooLarge), 1);
        assert_eq!(counters.refused(Status::HeaderFieldsTooLarge), 2);
        assert_eq!(counters.refused(Status::RequestTimeout), 1);
        assert_eq!(counters.refused(Status::NotFound), 0, "a 404 is not a refusal");
        counters.keepalive_closed();
        let text = counters.render();
        assert!(line(&text, "asyncored_http_requests_refused_total{status=\"431\"} 2"), "{text}");
        assert!(line(&text, "asyncored_http_requests_refused_total{status=\"408\"} 1"), "{text}");
        assert!(line(&text, "asyncored_http_requests_refused_total{status=\"414\"} 0"), "{text}");
        assert!(line(&text, "asyncored_http_keepalive_closed_total 1"), "{text}");
        assert!(line(&text, "# TYPE asyncored_http_requests_refused_total counter"), "{text}");
    }
}
