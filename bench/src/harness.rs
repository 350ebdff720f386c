//! The one command: prepares the machine (descriptor limit, cores, the
//! daemon's build), runs each selected scenario against its servers (fresh
//! server processes for every scenario, measured in turn, round after
//! round), and prints the table and the targets. Progress goes to stderr,
//! the report to stdout.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, anyhow, bail};

use crate::load::echo::EchoExchange;
use crate::load::http::HttpExchange;
use crate::load::{self, Plan, hold};
use crate::report::{self, Detail, Figures, Ratio, Row};
use crate::scenario::{self, SCENARIOS, Scenario, StormClients, Workload};
use crate::servers::{Launcher, Server, ServerKind};
use crate::storm::{self, Storm};
use crate::{procfs, sys};

/// Connections the hold scenario aims for; fewer when `RLIMIT_NOFILE` is
/// lower (each side of a loopback connection is a descriptor of its own
/// process).
const HOLD_CONNECTIONS: usize = 19_000;
/// Descriptors the generator keeps for itself besides held connections.
const SPARE_DESCRIPTORS: u64 = 500;
/// Busy connections of the storm scenario.
const STORM_BUSY: usize = 50;

/// The harness's command line.
#[derive(Debug, clap::Parser)]
#[command(
    name = "asyncore-bench",
    about = "Benchmarks asyncored against minimal epoll servers, tokio and Python's asyncore"
)]
pub struct Options {
    /// About half a second per server and scenario and one repetition:
    /// checks that every server answers correctly, in well under a minute.
    #[arg(long)]
    pub smoke: bool,
    /// Runs only this scenario (repeatable; --list shows them).
    #[arg(long = "scenario", value_name = "NAME")]
    pub scenarios: Vec<String>,
    /// Lists the scenarios and exits.
    #[arg(long)]
    pub list: bool,
    /// Seconds measured per repetition [default: 3; 0.5 with --smoke].
    #[arg(long, value_name = "SECONDS")]
    pub seconds: Option<f64>,
    /// Repetitions per scenario and server; the table shows medians
    /// [default: 3; 1 with --smoke].
    #[arg(long, value_name = "N")]
    pub repetitions: Option<usize>,
    /// Connections the hold scenario opens [default: 19000, or fewer if
    /// RLIMIT_NOFILE is lower].
    #[arg(long, value_name = "N")]
    pub hold: Option<usize>,
    /// Uses the asyncored and plugins already built instead of building them
    /// first (a release harness run through cargo builds them).
    #[arg(long)]
    pub no_build: bool,
}

/// How long each measurement lasts.
#[derive(Debug, Clone, Copy)]
struct Timing {
    warmup: Duration,
    measure: Duration,
    repetitions: usize,
}

impl Timing {
    fn plan(&self, connections: usize, depth: usize) -> Plan {
        Plan { connections, depth, warmup: self.warmup, measure: self.measure }
    }
}

/// Runs the benchmark as `options` say and prints its report.
///
/// # Errors
///
/// If the machine cannot be prepared, or any server failed a scenario (the
/// report is printed first, with the failure in its row).
pub fn run(options: Options) -> anyhow::Result<()> {
    if options.list {
        for scenario in SCENARIOS {
            println!("{:<22} {}", scenario.name, scenario.description);
        }
        return Ok(());
    }
    let selected: Vec<&'static Scenario> = if options.scenarios.is_empty() {
        SCENARIOS.iter().collect()
    } else {
        options
            .scenarios
            .iter()
            .map(|name| scenario::find(name).ok_or_else(|| anyhow!("no scenario {name:?} (--list shows them)")))
            .collect::<anyhow::Result<_>>()?
    };
    let timing = Timing {
        warmup: Duration::from_millis(if options.smoke { 100 } else { 500 }),
        measure: Duration::from_secs_f64(options.seconds.unwrap_or(if options.smoke { 0.5 } else { 3.0 })),
        repetitions: options.repetitions.unwrap_or(if options.smoke { 1 } else { 3 }).max(1),
    };
    let descriptors = sys::raise_fd_limit().context("raising RLIMIT_NOFILE")?;
    let hold_connections =
        options.hold.unwrap_or(HOLD_CONNECTIONS).min(descriptors.saturating_sub(SPARE_DESCRIPTORS) as usize);
    let cpus = sys::allowed_cpus().context("sched_getaffinity")?;
    // Server on one core, generator (this thread, and every thread started
    // from here on: the gRPC clients' runtime) on another, when there are two.
    let (server_cpu, generator_cpu) = match cpus.as_slice() {
        [server, generator, ..] => (Some(*server), Some(*generator)),
        _ => (None, None),
    };
    if let Some(cpu) = generator_cpu {
        sys::pin_current_thread(cpu).context("pinning the generator")?;
    }

    let bin_dir = std::env::current_exe()?.parent().context("the harness's directory")?.to_path_buf();
    let release = bin_dir.file_name().is_some_and(|name| name == "release");
    if release && !options.no_build {
        build_daemon()?;
    }
    check_binaries(&bin_dir)?;
    if !release {
        eprintln!(
            "asyncore-bench: a debug build: the figures say nothing about speed, only that servers answer correctly"
        );
    }

    let started = Instant::now();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("grpc-client")
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let work_dir = std::env::temp_dir().join(format!("asyncore-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work_dir).with_context(|| format!("creating {}", work_dir.display()))?;
    let launcher = Launcher::new(bin_dir, work_dir.clone(), server_cpu, runtime.handle().clone())?;

    let mut rows = Vec::new();
    for &scenario in &selected {
        let servers: Vec<ServerKind> = scenario
            .workload
            .servers(options.smoke)
            .iter()
            .copied()
            .filter(|&kind| {
                let available = launcher.available(kind);
                if !available {
                    eprintln!("{}: {kind}: skipped (python3 without asyncore)", scenario.name);
                }
                available
            })
            .collect();
        let scenario_started = Instant::now();
        let new_rows = run_scenario(&launcher, scenario, &servers, &timing, hold_connections);
        for row in &new_rows {
            match &row.outcome {
                Ok(figures) => eprintln!(
                    "{}: {}: {:.0} {}/s; CPU server {:.0}%, generator {:.0}%, irq {:.0}%, other {:.0}%",
                    scenario.name,
                    row.server_label(),
                    figures.throughput,
                    scenario.workload.unit(),
                    figures.server_cpu * 100.0,
                    figures.generator_cpu * 100.0,
                    figures.interrupt_cpu * 100.0,
                    figures.other_cpu * 100.0,
                ),
                Err(error) => eprintln!("{}: {}: FAILED: {error}", scenario.name, row.server_label()),
            }
        }
        eprintln!("{}: {:.1} s", scenario.name, scenario_started.elapsed().as_secs_f64());
        rows.extend(new_rows);
    }
    report::compare_to_ceilings(&mut rows);
    drop(launcher);
    runtime.shutdown_timeout(Duration::from_secs(1));

    let failures = rows.iter().filter(|row| row.outcome.is_err()).count();
    println!("{}", machine(&timing, &cpus, server_cpu, generator_cpu, release, options.smoke));
    println!("{}", report::table(&rows));
    let checks = report::checks(&rows);
    if !checks.is_empty() {
        println!("{}", report::checks_table(&checks));
    }
    println!("Measurements took {:.1} s.", started.elapsed().as_secs_f64());
    if failures > 0 {
        eprintln!("asyncore-bench: server logs kept in {}", work_dir.display());
        bail!("{failures} of {} measurements failed", rows.len());
    }
    let _ = std::fs::remove_dir_all(&work_dir);
    Ok(())
}

/// Builds asyncored and the plugins the scenarios load, as the README says,
/// so that a release run never measures a stale daemon.
fn build_daemon() -> anyhow::Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("the workspace")?;
    eprintln!("asyncore-bench: building asyncored and its echo and http plugins (--no-build skips this)");
    let status = Command::new(cargo)
        .current_dir(workspace)
        .args(["build", "--release", "-p", "asyncored", "-p", "asyncore-plugin-echo", "-p", "asyncore-plugin-http"])
        .status()
        .context("running cargo")?;
    if !status.success() {
        bail!("building asyncored failed ({status})");
    }
    Ok(())
}

fn check_binaries(bin_dir: &Path) -> anyhow::Result<()> {
    let needed = [
        "asyncored",
        "libasyncore_plugin_echo.so",
        "libasyncore_plugin_http.so",
        "bench-epoll-echo",
        "bench-epoll-http",
        "bench-tokio-echo",
    ];
    let missing: Vec<&str> = needed.iter().copied().filter(|name| !bin_dir.join(name).exists()).collect();
    if !missing.is_empty() {
        bail!(
            "missing from {}: {}; build them with `cargo build --release -p asyncored -p asyncore-plugin-echo \
             -p asyncore-plugin-http -p asyncore-bench` (or `cargo build --workspace` for a debug run)",
            bin_dir.display(),
            missing.join(", ")
        );
    }
    Ok(())
}

/// Runs one scenario against its servers: a row per server, and two for
/// the storm.
fn run_scenario(
    launcher: &Launcher,
    scenario: &'static Scenario,
    servers: &[ServerKind],
    timing: &Timing,
    hold: usize,
) -> Vec<Row> {
    let failed = |kind: ServerKind, error: anyhow::Error| Row::new(scenario, kind, Err(format!("{error:#}")));
    match scenario.workload {
        Workload::Echo { connections, message, depth, idle: 0 } => {
            let plan = timing.plan(connections, depth);
            in_turn(launcher, scenario, servers, timing, |server| {
                load::drive(server.address, server.pid, &plan, |index| EchoExchange::new(message, index))
            })
        }
        Workload::Echo { connections, message, depth, idle } => {
            let plan = timing.plan(connections, depth);
            let drive = |server: &Server| -> anyhow::Result<Figures> {
                let sample = load::drive(server.address, server.pid, &plan, |index| EchoExchange::new(message, index))?;
                Ok(Figures::from_sample(&sample))
            };
            // Each round, on each server: the load alone, then beside the
            // idle connections, which are closed again before the next
            // server's turn (5,000 idle connections to every server at
            // once would take more descriptors than the generator has).
            let results = rounds(launcher, servers, timing, |server| {
                let without = drive(server)?;
                let _idle = hold::open(server.address, server.pid, idle).context("opening the idle connections")?;
                Ok((drive(server)?, without))
            });
            let withouts: Vec<Option<(Figures, Ratio)>> = results
                .iter()
                .map(|(_, rounds)| {
                    let rounds = rounds.as_ref().ok().filter(|rounds| !rounds.is_empty())?;
                    let without: Vec<Figures> = rounds.iter().map(|(_, without)| *without).collect();
                    let vs_without = report::paired_ratio(rounds.iter().map(|(with, without)| (with, without)))?;
                    Some((Figures::median(&without), vs_without))
                })
                .collect();
            let with = results
                .into_iter()
                .map(|(kind, rounds)| (kind, rounds.map(|rounds| rounds.into_iter().map(|(with, _)| with).collect())))
                .collect();
            rows_in_turn(scenario, with, |index| match withouts[index] {
                Some((without, vs_without)) => Detail::Idle { without, vs_without },
                None => Detail::Plain,
            })
        }
        Workload::Http { connections, pipeline } => {
            let plan = timing.plan(connections, pipeline);
            in_turn(launcher, scenario, servers, timing, |server| {
                load::drive(server.address, server.pid, &plan, |_| HttpExchange::default())
            })
        }
        Workload::Hold => run_hold(launcher, scenario, servers, timing, hold),
        Workload::Storm { channels, clients } => servers
            .iter()
            .flat_map(|&kind| {
                run_storm(launcher, scenario, kind, timing, channels, clients)
                    .unwrap_or_else(|error| vec![failed(kind, error)])
            })
            .collect(),
    }
}

/// Runs `measure` against every server in turn, `timing.repetitions`
/// times round. All the servers run at once (those not measured are idle),
/// so that a burst of other work on the machine falls on one round of each
/// server rather than on every repetition of one; the ratios to the
/// ceiling are taken per round.
fn in_turn(
    launcher: &Launcher,
    scenario: &'static Scenario,
    servers: &[ServerKind],
    timing: &Timing,
    measure: impl Fn(&Server) -> anyhow::Result<load::Sample>,
) -> Vec<Row> {
    let results = rounds(launcher, servers, timing, |server| Ok(Figures::from_sample(&measure(server)?)));
    rows_in_turn(scenario, results, |_| Detail::Plain)
}

/// What each server gave in each round, or why it stopped.
type Rounds<T> = Vec<(ServerKind, Result<Vec<T>, String>)>;

/// Starts every server, then runs `measure` on each in turn, round after
/// round; a server that fails is left out of the later rounds.
fn rounds<T>(
    launcher: &Launcher,
    servers: &[ServerKind],
    timing: &Timing,
    measure: impl Fn(&Server) -> anyhow::Result<T>,
) -> Rounds<T> {
    let mut running: Vec<(ServerKind, Result<Server, String>, Vec<T>)> = servers
        .iter()
        .map(|&kind| (kind, launcher.start(kind).map_err(|error| format!("{error:#}")), Vec::new()))
        .collect();
    for _ in 0..timing.repetitions {
        for (_, server, rounds) in &mut running {
            let Ok(started) = server else { continue };
            match measure(started) {
                Ok(round) => rounds.push(round),
                Err(error) => {
                    let error = format!("{:#}", started.failure(error));
                    *server = Err(error);
                }
            }
        }
    }
    running.into_iter().map(|(kind, server, rounds)| (kind, server.map(|_| rounds))).collect()
}

/// Rows from rounds of servers measured in turn: medians, and the median
/// of per-round ratios to the ceiling (`detail` adds what else a row says).
fn rows_in_turn(scenario: &'static Scenario, results: Rounds<Figures>, detail: impl Fn(usize) -> Detail) -> Vec<Row> {
    let ceiling: Option<Vec<Figures>> =
        results.iter().find(|(kind, _)| kind.is_ceiling()).and_then(|(_, rounds)| rounds.as_ref().ok().cloned());
    results
        .into_iter()
        .enumerate()
        .map(|(index, (kind, rounds))| match rounds {
            Ok(rounds) => Row {
                vs_ceiling: ceiling.as_ref().and_then(|ceiling| report::paired_ratio(rounds.iter().zip(ceiling))),
                detail: detail(index),
                ..Row::new(scenario, kind, Ok(Figures::median(&rounds)))
            },
            Err(error) => Row::new(scenario, kind, Err(error)),
        })
        .collect()
}

/// Starts `kind`, runs `body` against it, and adds the server's log to an
/// error.
fn with_server<T>(
    launcher: &Launcher,
    kind: ServerKind,
    body: impl FnOnce(&Server) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let mut server = launcher.start(kind)?;
    body(&server).map_err(|error| server.failure(error))
}

/// Opens and holds `count` connections on a fresh server per repetition
/// (the servers in turn): the rate, the server's CPU, and its resident
/// memory per connection.
fn run_hold(
    launcher: &Launcher,
    scenario: &'static Scenario,
    servers: &[ServerKind],
    timing: &Timing,
    count: usize,
) -> Vec<Row> {
    let mut results: Vec<(ServerKind, Result<Vec<Figures>, String>)> =
        servers.iter().map(|&kind| (kind, Ok(Vec::new()))).collect();
    let mut bytes: Vec<Vec<f64>> = vec![Vec::new(); servers.len()];
    for _ in 0..timing.repetitions {
        for ((kind, result), bytes) in results.iter_mut().zip(&mut bytes) {
            let Ok(rounds) = result else { continue };
            let run = with_server(launcher, *kind, |server| {
                let before = procfs::resident_bytes(server.pid)?;
                let held = hold::open(server.address, server.pid, count)?;
                let after = procfs::resident_bytes(server.pid)?;
                let figures = Figures::of(count as u64, held.elapsed, held.cpu, held.latency, count as u64);
                Ok((figures, after.saturating_sub(before) as f64 / count as f64))
            });
            match run {
                Ok((figures, per_connection)) => {
                    rounds.push(figures);
                    bytes.push(per_connection);
                }
                Err(error) => *result = Err(format!("{error:#}")),
            }
        }
    }
    for bytes in &mut bytes {
        bytes.sort_by(f64::total_cmp);
    }
    rows_in_turn(scenario, results, |index| Detail::Hold {
        bytes_per_connection: bytes[index].get(bytes[index].len() / 2).copied().unwrap_or_default(),
        connections: count,
    })
}

/// The storm scenario: the echo load beside `channels` idle channels, at
/// rest and under the storm, alternating, on one daemon.
fn run_storm(
    launcher: &Launcher,
    scenario: &'static Scenario,
    kind: ServerKind,
    timing: &Timing,
    channels: usize,
    storm_clients: StormClients,
) -> anyhow::Result<Vec<Row>> {
    let plan = timing.plan(STORM_BUSY, 1);
    with_server(launcher, kind, |server| {
        let control = server.control.context("the storm needs asyncored's control API")?;
        let _idle = hold::open(server.address, server.pid, channels).context("opening the idle channels")?;
        let listed = storm::count_channels(&launcher.runtime, control)?;
        if listed < channels {
            bail!("ListChannels lists {listed} channels, {channels} are open");
        }
        let (mut quiet, mut stormy, mut clients) = (Vec::new(), Vec::new(), Vec::new());
        let drive = || load::drive(server.address, server.pid, &plan, |index| EchoExchange::new(64, index));
        for _ in 0..timing.repetitions {
            quiet.push(Figures::from_sample(&drive()?));
            let storm = Storm::start(&launcher.runtime, control, storm_clients)?;
            let sample = drive();
            let figures = storm.stop()?;
            stormy.push(Figures::from_sample(&sample?));
            clients.push(figures);
        }
        clients.sort_by(|a, b| a.listings_per_second.total_cmp(&b.listings_per_second));
        let vs_rest = report::paired_ratio(stormy.iter().zip(&quiet)).context("no storm measured")?;
        // Per pair: the server's CPU under the storm, less what its echo
        // load cost per message at rest.
        let mut server_cores: Vec<f64> = stormy
            .iter()
            .zip(&quiet)
            .map(|(storm, rest)| storm.server_cpu - storm.throughput * rest.server_cpu / rest.throughput)
            .collect();
        server_cores.sort_by(f64::total_cmp);
        let at_rest = Row { detail: Detail::AtRest, ..Row::new(scenario, kind, Ok(Figures::median(&quiet))) };
        let under_storm = Row {
            detail: Detail::Storm {
                clients: clients[clients.len() / 2],
                vs_rest,
                server_cores: server_cores[server_cores.len() / 2],
            },
            ..Row::new(scenario, kind, Ok(Figures::median(&stormy)))
        };
        Ok(vec![at_rest, under_storm])
    })
}

/// The report's heading: when, where, and how it was measured.
fn machine(
    timing: &Timing,
    cpus: &[usize],
    server_cpu: Option<usize>,
    generator_cpu: Option<usize>,
    release: bool,
    smoke: bool,
) -> String {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let model = read("/proc/cpuinfo")
        .lines()
        .find_map(|line| {
            line.strip_prefix("model name").and_then(|rest| rest.split_once(':')).map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".to_string());
    let kernel = read("/proc/sys/kernel/osrelease").trim().to_string();
    // Read-only: which commit the daemon was built from (uncommitted
    // changes are not shown).
    let commit = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map(|output| format!(", commit {}", String::from_utf8_lossy(&output.stdout).trim()))
        .unwrap_or_default();
    let pinning = match (server_cpu, generator_cpu) {
        (Some(server), Some(generator)) => format!("servers pinned to CPU {server}, load generator to CPU {generator}"),
        _ => "one CPU: nothing pinned".to_string(),
    };
    format!(
        "## asyncore-bench{}, {}{commit}\n\n{} CPUs ({model}), Linux {kernel}; {pinning}; {} build; \
         {:.1} s measured after {:.1} s of warm-up, median of {} repetition(s).\n",
        if smoke { " --smoke" } else { "" },
        utc_now(),
        cpus.len(),
        if release { "release" } else { "debug" },
        timing.measure.as_secs_f64(),
        timing.warmup.as_secs_f64(),
        timing.repetitions,
    )
}

/// The current UTC time as `YYYY-MM-DD HH:MM UTC`.
fn utc_now() -> String {
    let seconds = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |since| since.as_secs());
    let (days, of_day) = (seconds / 86_400, seconds % 86_400);
    // Howard Hinnant's civil_from_days, for days since 1970-01-01.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 { month_index + 3 } else { month_index - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02} UTC", of_day / 3600, of_day % 3600 / 60)
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_scenario_has_a_unique_name_and_servers() {
        let mut names: Vec<&str> = super::SCENARIOS.iter().map(|scenario| scenario.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), super::SCENARIOS.len());
        for scenario in super::SCENARIOS {
            assert!(!scenario.workload.servers(true).is_empty(), "{}", scenario.name);
        }
    }
}
