//! The results: figures per server and scenario (medians of the
//! repetitions), their ratios to the ceiling of the same run, the table
//! that prints them, and the targets checked against them.

use std::fmt::Write as _;
use std::time::Duration;

use crate::load::{Percentiles, Sample};
use crate::procfs::CpuUse;
use crate::scenario::{Scenario, StormClients, Workload};
use crate::servers::ServerKind;
use crate::storm::StormFigures;

/// What one server did in one scenario.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Figures {
    /// Answers (messages, requests, connections) per second.
    pub(crate) throughput: f64,
    /// Server CPU time over wall time (1.0 is one core busy).
    pub(crate) server_cpu: f64,
    /// The load generator's CPU time over wall time.
    pub(crate) generator_cpu: f64,
    /// Interrupt and soft-interrupt time of all CPUs over wall time.
    pub(crate) interrupt_cpu: f64,
    /// The rest of the machine's CPU time over wall time: other work that
    /// competed with the measurement.
    pub(crate) other_cpu: f64,
    /// Answers per second of server CPU time; `None` when the server used
    /// less than a clock tick.
    pub(crate) efficiency: Option<f64>,
    pub(crate) latency: Percentiles,
    /// Bytes received per answer.
    pub(crate) bytes_per_answer: f64,
}

impl Figures {
    pub(crate) fn of(completed: u64, window: Duration, cpu: CpuUse, latency: Percentiles, bytes: u64) -> Figures {
        let seconds = window.as_secs_f64().max(1e-9);
        Figures {
            throughput: completed as f64 / seconds,
            server_cpu: cpu.server.as_secs_f64() / seconds,
            generator_cpu: cpu.generator.as_secs_f64() / seconds,
            interrupt_cpu: cpu.interrupts.as_secs_f64() / seconds,
            other_cpu: cpu.other.as_secs_f64() / seconds,
            efficiency: (cpu.server > Duration::ZERO).then(|| completed as f64 / cpu.server.as_secs_f64()),
            latency,
            bytes_per_answer: if completed == 0 { 0.0 } else { bytes as f64 / completed as f64 },
        }
    }

    pub(crate) fn from_sample(sample: &Sample) -> Figures {
        Figures::of(sample.completed, sample.window, sample.cpu, sample.latency, sample.bytes_in)
    }

    /// The median of each figure over the repetitions.
    pub(crate) fn median(runs: &[Figures]) -> Figures {
        assert!(!runs.is_empty(), "no repetitions");
        fn median_of<T: Copy + PartialOrd>(mut values: Vec<T>) -> T {
            values.sort_by(|a, b| a.partial_cmp(b).expect("figures are not NaN"));
            values[values.len() / 2]
        }
        let efficiencies: Vec<f64> = runs.iter().filter_map(|run| run.efficiency).collect();
        Figures {
            throughput: median_of(runs.iter().map(|run| run.throughput).collect()),
            server_cpu: median_of(runs.iter().map(|run| run.server_cpu).collect()),
            generator_cpu: median_of(runs.iter().map(|run| run.generator_cpu).collect()),
            interrupt_cpu: median_of(runs.iter().map(|run| run.interrupt_cpu).collect()),
            other_cpu: median_of(runs.iter().map(|run| run.other_cpu).collect()),
            efficiency: (!efficiencies.is_empty()).then(|| median_of(efficiencies)),
            latency: Percentiles {
                p50: median_of(runs.iter().map(|run| run.latency.p50).collect()),
                p99: median_of(runs.iter().map(|run| run.latency.p99).collect()),
            },
            bytes_per_answer: median_of(runs.iter().map(|run| run.bytes_per_answer).collect()),
        }
    }

    /// `self` over `other`: throughput, and efficiency where both have one.
    pub(crate) fn ratio_to(&self, other: &Figures) -> Ratio {
        Ratio {
            throughput: self.throughput / other.throughput,
            efficiency: self.efficiency.zip(other.efficiency).map(|(mine, theirs)| mine / theirs),
        }
    }
}

/// One set of figures over another.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ratio {
    pub(crate) throughput: f64,
    pub(crate) efficiency: Option<f64>,
}

/// The median of per-round ratios of the first figures of each pair to
/// the second: measured close together in time, the two sides of a pair
/// share whatever else the machine was doing, which a ratio of medians
/// taken minutes apart would not.
pub(crate) fn paired_ratio<'a>(pairs: impl IntoIterator<Item = (&'a Figures, &'a Figures)>) -> Option<Ratio> {
    let ratios: Vec<Ratio> = pairs.into_iter().map(|(mine, theirs)| mine.ratio_to(theirs)).collect();
    if ratios.is_empty() {
        return None;
    }
    let median = |mut values: Vec<f64>| -> Option<f64> {
        values.sort_by(f64::total_cmp);
        values.get(values.len() / 2).copied()
    };
    Some(Ratio {
        throughput: median(ratios.iter().map(|ratio| ratio.throughput).collect())?,
        efficiency: median(ratios.iter().filter_map(|ratio| ratio.efficiency).collect()),
    })
}

/// What a row carries besides its figures.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Detail {
    Plain,
    /// The same load without the idle connections, on the same server
    /// (medians), and the median of per-round ratios to it.
    Idle {
        without: Figures,
        vs_without: Ratio,
    },
    /// Resident memory per held connection.
    Hold {
        bytes_per_connection: f64,
        connections: usize,
    },
    /// The storm scenario's echo load with the control API at rest.
    AtRest,
    /// ... and under the storm.
    Storm {
        clients: StormFigures,
        /// To the load at rest (pairs measured back to back).
        vs_rest: Ratio,
        /// Server CPU the storm took, in cores: what the server spent
        /// beyond what the echo load alone costs at rest.
        server_cores: f64,
    },
}

/// One line of the table.
#[derive(Debug)]
pub(crate) struct Row {
    pub(crate) scenario: &'static Scenario,
    pub(crate) server: ServerKind,
    /// The figures, or why there are none.
    pub(crate) outcome: Result<Figures, String>,
    /// To the scenario's ceiling: the median of per-round ratios where the
    /// servers ran in turn, else the ratio of medians.
    pub(crate) vs_ceiling: Option<Ratio>,
    pub(crate) detail: Detail,
}

impl Row {
    pub(crate) fn new(scenario: &'static Scenario, server: ServerKind, outcome: Result<Figures, String>) -> Row {
        Row { scenario, server, outcome, vs_ceiling: None, detail: Detail::Plain }
    }

    fn figures(&self) -> Option<&Figures> {
        self.outcome.as_ref().ok()
    }

    /// The server's name, with the storm scenario's two cases told apart.
    pub(crate) fn server_label(&self) -> String {
        match self.detail {
            Detail::AtRest => format!("{}, at rest", self.server),
            Detail::Storm { .. } => format!("{}, storm", self.server),
            _ => self.server.to_string(),
        }
    }
}

/// Fills in the ratio to the ceiling of rows that have none yet, as a ratio
/// of medians.
pub(crate) fn compare_to_ceilings(rows: &mut [Row]) {
    let ceilings: Vec<(&'static str, Figures)> = rows
        .iter()
        .filter(|row| row.server.is_ceiling())
        .filter_map(|row| Some((row.scenario.name, *row.figures()?)))
        .collect();
    for row in rows.iter_mut().filter(|row| row.vs_ceiling.is_none()) {
        let ceiling = ceilings.iter().find(|(name, _)| *name == row.scenario.name);
        if let (Some((_, ceiling)), Ok(figures)) = (ceiling, &row.outcome) {
            row.vs_ceiling = Some(figures.ratio_to(ceiling));
        }
    }
}

fn rate(value: f64) -> String {
    if value >= 1e6 {
        format!("{:.2}M", value / 1e6)
    } else if value >= 1e4 {
        format!("{:.1}k", value / 1e3)
    } else if value >= 100.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.1}")
    }
}

fn latency(value: Duration) -> String {
    let micros = value.as_secs_f64() * 1e6;
    if micros < 10_000.0 { format!("{micros:.0} µs") } else { format!("{:.1} ms", micros / 1000.0) }
}

fn ratio(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_string(), |value| format!("{value:.2}"))
}

fn notes(row: &Row, figures: &Figures) -> String {
    let efficiency = |value: Option<f64>| value.map_or_else(|| "-".to_string(), rate);
    let mut notes = Vec::new();
    if let Workload::Http { .. } = row.scenario.workload {
        notes.push(format!("{:.0} B/response", figures.bytes_per_answer));
    }
    match &row.detail {
        Detail::Plain => {}
        Detail::Idle { without, vs_without } => {
            notes.push(format!(
                "vs without idle: {:.2} (per CPU {}); without: {} msg/s, {} per CPU-s",
                vs_without.throughput,
                ratio(vs_without.efficiency),
                rate(without.throughput),
                efficiency(without.efficiency)
            ));
        }
        Detail::Hold { bytes_per_connection, connections } => {
            notes.push(format!("{connections} held; RSS {bytes_per_connection:.0} B/conn"));
        }
        Detail::AtRest => notes.push("control API at rest".to_string()),
        Detail::Storm { clients, vs_rest, server_cores } => {
            let listings = if clients.listings_per_second > 0.0 {
                format!("{:.1} listings/s of {} channels, ", clients.listings_per_second, clients.channels_listed)
            } else {
                String::new()
            };
            notes.push(format!(
                "vs at rest: {:.2} (per CPU {}); the storm took {:.0}% of a core in the server; \
                 {listings}{} stream(s) of {:.1} stats updates/s of up to {} channels",
                vs_rest.throughput,
                ratio(vs_rest.efficiency),
                server_cores * 100.0,
                clients.watchers,
                clients.updates_per_second,
                clients.channels_watched
            ));
        }
    }
    notes.join("; ")
}

/// The table, in Markdown.
pub(crate) fn table(rows: &[Row]) -> String {
    let mut out = String::new();
    out.push_str(
        "| scenario | server | throughput | per server CPU-second | p50 | p99 | x ceiling | x ceiling per CPU | CPU %: server / generator / irq / other | notes |\n\
         | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |\n",
    );
    for row in rows {
        let server = row.server_label();
        let unit = row.scenario.workload.unit();
        match &row.outcome {
            Ok(figures) => {
                let _ = writeln!(
                    out,
                    "| {} | {} | {} {unit}/s | {} {unit} | {} | {} | {} | {} | {:.0} / {:.0} / {:.0} / {:.0} | {} |",
                    row.scenario.name,
                    server,
                    rate(figures.throughput),
                    figures.efficiency.map_or_else(|| "-".to_string(), rate),
                    latency(figures.latency.p50),
                    latency(figures.latency.p99),
                    ratio(row.vs_ceiling.map(|ratio| ratio.throughput)),
                    ratio(row.vs_ceiling.and_then(|ratio| ratio.efficiency)),
                    figures.server_cpu * 100.0,
                    figures.generator_cpu * 100.0,
                    figures.interrupt_cpu * 100.0,
                    figures.other_cpu * 100.0,
                    notes(row, figures),
                );
            }
            Err(error) => {
                let error = error.replace('\n', " ").replace('|', "/");
                let _ = writeln!(out, "| {} | {} | FAILED | | | | | | | {error} |", row.scenario.name, server);
            }
        }
    }
    out
}

/// One of the targets, checked against a figure of this run.
#[derive(Debug)]
pub(crate) struct Check {
    pub(crate) target: &'static str,
    pub(crate) scenario: &'static str,
    pub(crate) figure: String,
    pub(crate) met: bool,
}

/// The targets for asyncored, each against the figures of this run.
pub(crate) fn checks(rows: &[Row]) -> Vec<Check> {
    let mut checks = Vec::new();
    for row in rows.iter().filter(|row| row.server.is_asyncored()) {
        if row.outcome.is_err() {
            continue;
        }
        let scenario = row.scenario.name;
        let vs_ceiling = row.vs_ceiling.and_then(|ratio| ratio.efficiency);
        match (row.scenario.workload, &row.detail) {
            (Workload::Echo { .. }, _) => {
                if let Some(efficiency) = vs_ceiling {
                    checks.push(Check {
                        target: "echo: msg per server CPU-s >= 0.95x epoll ceiling",
                        scenario,
                        figure: format!("{efficiency:.2}x"),
                        met: efficiency >= 0.95,
                    });
                }
                let vs_without = match &row.detail {
                    Detail::Idle { vs_without, .. } => vs_without.efficiency,
                    _ => None,
                };
                if let Some(efficiency) = vs_without {
                    checks.push(Check {
                        target: "5,000 idle: msg per server CPU-s >= 0.95x without",
                        scenario,
                        figure: format!("{efficiency:.2}x"),
                        met: efficiency >= 0.95,
                    });
                }
            }
            (Workload::Http { .. }, _) => {
                if let Some(efficiency) = vs_ceiling {
                    checks.push(Check {
                        target: "HTTP: req per server CPU-s >= 0.9x epoll ceiling",
                        scenario,
                        figure: format!("{efficiency:.2}x"),
                        met: efficiency >= 0.9,
                    });
                }
            }
            (Workload::Hold, Detail::Hold { bytes_per_connection, .. }) => checks.push(Check {
                target: "<= 1 KiB resident memory per held connection",
                scenario,
                figure: format!("{bytes_per_connection:.0} B"),
                met: *bytes_per_connection <= 1024.0,
            }),
            (Workload::Storm { clients, .. }, Detail::Storm { vs_rest, server_cores, .. }) => {
                let loss = 1.0 - vs_rest.throughput;
                checks.push(Check {
                    target: match clients {
                        StormClients::ListAndWatch => "control-plane storm: < 5% echo throughput lost",
                        StormClients::Watchers(_) => "10 watchers of what changed: < 5% echo throughput lost",
                    },
                    scenario,
                    figure: format!("{:.1}% lost ({:.0}% of a core)", loss * 100.0, server_cores * 100.0),
                    met: loss < 0.05,
                });
            }
            _ => {}
        }
    }
    checks
}

/// The targets, in Markdown.
pub(crate) fn checks_table(checks: &[Check]) -> String {
    let mut out = String::from("| target | scenario | asyncored | met |\n| --- | --- | ---: | --- |\n");
    for check in checks {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} |",
            check.target,
            check.scenario,
            check.figure,
            if check.met { "yes" } else { "**no**" }
        );
    }
    out
}
