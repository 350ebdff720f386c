//! `GET /metrics`: parsed as Prometheus parses it (`prometheus-parse`), its
//! counters match what the test did: connections accepted, bytes in and
//! out (of live and of closed channels, across scrapes), a panic in the
//! `panicky` fixture, generations' states, and the metrics a plugin
//! defines itself (the `cache` fixture's), labelled with plugin and
//! generation.

use std::{
    collections::BTreeSet,
    io::{Read, Write},
};

use asyncore_tests::{InProcessDaemon, Options, connect, eventually};
use prometheus_parse::{Scrape, Value};
use serde_json::json;

use crate::{http_api::Http, runtime};

/// One scrape: each sample by name and its labels.
struct Metrics {
    scrape: Scrape,
}

impl Metrics {
    async fn scrape(http: &Http) -> Metrics {
        let answer = http.get("/metrics").await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        assert_eq!(answer.content_type, "text/plain; version=0.0.4; charset=utf-8");
        let text = answer.text();
        let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("the Prometheus text format");
        Metrics { scrape }
    }

    #[track_caller]
    fn counter(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let sample = self.sample(name, labels);
        match sample.value {
            Value::Counter(v) => v,
            ref other => panic!("{name} {labels:?}: not a counter: {other:?}"),
        }
    }

    #[track_caller]
    fn gauge(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let sample = self.sample(name, labels);
        match sample.value {
            Value::Gauge(v) => v,
            ref other => panic!("{name} {labels:?}: not a gauge: {other:?}"),
        }
    }

    #[track_caller]
    fn sample(&self, name: &str, labels: &[(&str, &str)]) -> &prometheus_parse::Sample {
        let mut matching = self
            .scrape
            .samples
            .iter()
            .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)));
        let sample = matching.next().unwrap_or_else(|| panic!("no sample {name} {labels:?}"));
        assert!(matching.next().is_none(), "{name} {labels:?} matches more than one sample");
        sample
    }

    fn help(&self, name: &str) -> Option<&str> {
        self.scrape.docs.get(name).map(String::as_str)
    }
}

#[test]
fn metrics_count_accepts_bytes_panics_and_generations() {
    runtime().block_on(async {
        let options =
            Options { plugins: vec!["asyncore_plugin_echo", "asyncore_fixture_panicky"], ..Options::default() };
        let daemon = InProcessDaemon::start_with(options).await;
        let http = Http::of(&daemon);
        let mut client = daemon.client().await;
        let (echo, echo_address) = client.start_listener("echo", &[]).await;
        let (panicky, panicky_address) = client.start_listener("panicky", &[]).await;
        let (echo, panicky) = (echo.to_string(), panicky.to_string());

        let mut peers = Vec::new();
        for size in [1000, 2000, 3000] {
            let mut peer = connect(echo_address);
            let bytes = vec![b'x'; size];
            peer.write_all(&bytes).unwrap();
            let mut back = vec![0; size];
            peer.read_exact(&mut back).unwrap();
            peers.push(peer);
        }
        let before = Metrics::scrape(&http).await;
        assert_eq!(before.counter("asyncored_accepts_total", &[]), 3.0);
        assert_eq!(before.counter("asyncored_bytes_in_total", &[("listener", &echo)]), 6000.0);
        assert_eq!(before.counter("asyncored_bytes_out_total", &[("listener", &echo)]), 6000.0);
        assert_eq!(before.gauge("asyncored_listener_channels", &[("listener", &echo), ("plugin", "echo")]), 3.0);

        // Two peers leave; a third connection panics its dispatcher.
        peers.truncate(1);
        let mut doomed = connect(panicky_address);
        doomed.write_all(b"PANIC").unwrap();
        let mut rest = Vec::new();
        let _ = doomed.read_to_end(&mut rest);
        let after = eventually!(
            async || {
                let metrics = Metrics::scrape(&http).await;
                // A closed channel leaves its listener's count when its
                // dispatcher goes and the map once its socket has lingered.
                let settled = metrics.gauge("asyncored_listener_channels", &[("listener", &echo)]) == 1.0
                    && metrics.gauge("asyncored_listener_channels", &[("listener", &panicky)]) == 0.0
                    && metrics.gauge("asyncored_channels_open", &[]) == 3.0;
                settled.then_some(metrics)
            },
            "the closes to show in /metrics"
        )
        .await;
        assert_eq!(after.counter("asyncored_accepts_total", &[]), 4.0);
        // The closed channels' bytes stay counted.
        assert_eq!(after.counter("asyncored_bytes_in_total", &[("listener", &echo)]), 6000.0);
        assert_eq!(after.counter("asyncored_bytes_out_total", &[("listener", &echo)]), 6000.0);
        assert_eq!(after.counter("asyncored_bytes_in_total", &[("listener", &panicky)]), 5.0);
        assert_eq!(after.counter("asyncored_bytes_out_total", &[("listener", &panicky)]), 0.0);
        assert_eq!(after.counter("asyncored_panics_total", &[]), 1.0);
        let panicky1 = [("plugin", "panicky"), ("generation", "1")];
        assert_eq!(after.counter("asyncored_plugin_generation_panics_total", &panicky1), 1.0);
        assert_eq!(after.counter("asyncored_plugin_generation_panics_total", &[("plugin", "echo")]), 0.0);
        assert_eq!(after.gauge("asyncored_plugin_generation_live_channels", &[("plugin", "echo")]), 1.0);
        let echo1 = |state| [("plugin", "echo"), ("generation", "1"), ("state", state)];
        assert_eq!(after.gauge("asyncored_plugin_generation_state", &echo1("current")), 1.0);
        assert_eq!(after.gauge("asyncored_plugin_generation_state", &echo1("standby")), 0.0);
        assert_eq!(after.gauge("asyncored_listener_listening", &[("listener", &echo)]), 1.0);
        assert_eq!(after.counter("asyncored_bytes_dropped_total", &[]), 0.0);
        assert!(after.counter("asyncored_loop_passes_total", &[]) > 0.0);
        assert!(after.counter("asyncored_loop_handler_calls_total", &[]) > 0.0);
        assert!(after.counter("asyncored_loop_commands_total", &[]) > 0.0);
        assert!(after.help("asyncored_accepts_total").is_some_and(|h| h.contains("accepted")));

        // A callback that sleeps 50 ms (past the 10 ms default threshold)
        // is counted as slow.
        let mut sleeper = connect(panicky_address);
        sleeper.write_all(b"SLEEP").unwrap();
        let mut echoed = [0u8; 5];
        sleeper.read_exact(&mut echoed).unwrap();
        let slow = Metrics::scrape(&http).await;
        assert!(slow.counter("asyncored_loop_slow_callbacks_total", &[]) >= 1.0, "a slow callback is counted");
        assert!(slow.gauge("asyncored_loop_slowest_callback_seconds", &[]) >= 0.05);

        // A stopped listener says so; its bytes stay.
        http.delete(&format!("/v1/listeners/{echo}")).await.ok();
        let stopped = Metrics::scrape(&http).await;
        assert_eq!(stopped.gauge("asyncored_listener_listening", &[("listener", &echo)]), 0.0);
        assert_eq!(stopped.counter("asyncored_bytes_in_total", &[("listener", &echo)]), 6000.0);
        drop(peers);
    });
}

#[test]
fn plugin_metrics_are_exported_per_plugin_and_generation() {
    runtime().block_on(async {
        let options = Options { plugins: vec!["asyncore_fixture_cache"], ..Options::default() };
        let daemon = InProcessDaemon::start_with(options).await;
        let http = Http::of(&daemon);
        let mut client = daemon.client().await;
        let (_, address) = client.start_listener("cache", &[]).await;
        let mut peer = connect(address);
        let mut ask = |request: &[u8], answer: &[u8]| {
            peer.write_all(request).unwrap();
            let mut back = vec![0; answer.len()];
            peer.read_exact(&mut back).unwrap();
            assert_eq!(String::from_utf8_lossy(&back), String::from_utf8_lossy(answer));
        };
        ask(b"set k 1\r\nv\r\n", b"STORED\r\n");
        ask(b"get k\r\n", b"VALUE k 1\r\nv\r\nEND\r\n");
        ask(b"get nothing\r\n", b"END\r\n");

        let cache1 = [("plugin", "cache"), ("generation", "1")];
        let metrics = Metrics::scrape(&http).await;
        assert_eq!(metrics.counter("cache_hits_total", &cache1), 1.0);
        assert_eq!(metrics.counter("cache_misses_total", &cache1), 1.0);
        assert_eq!(metrics.gauge("cache_keys", &cache1), 1.0);
        assert_eq!(metrics.help("cache_hits_total"), Some("Gets that found their key."));

        // A reload is a new generation with metrics of its own (the store
        // moves over; its counters start again).
        let reloaded = http.post("/v1/plugins/cache:reload", json!({})).await.ok();
        assert_eq!(reloaded["currentGeneration"], 2);
        ask(b"get k\r\n", b"VALUE k 1\r\nv\r\nEND\r\n");
        let cache2 = [("plugin", "cache"), ("generation", "2")];
        let metrics = Metrics::scrape(&http).await;
        assert_eq!(metrics.counter("cache_hits_total", &cache1), 1.0);
        assert_eq!(metrics.counter("cache_hits_total", &cache2), 1.0);
        assert_eq!(metrics.counter("cache_misses_total", &cache1), 1.0);
        let generations: BTreeSet<&str> = metrics
            .scrape
            .samples
            .iter()
            .filter(|s| s.metric == "cache_hits_total")
            .map(|s| s.labels.get("generation").unwrap())
            .collect();
        assert_eq!(generations, BTreeSet::from(["1", "2"]));
    });
}
