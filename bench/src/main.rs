//! `herald-bench`: starts everything on loopback and prints a table.
//!
//! 1. Throughput and latency of Herald (`herald run`, 100 Webhooks, each alert matching 10 of
//!    them through conditions) at a fixed offered load and at saturation.
//! 2. The same load through a minimal forwarder (the ceiling) and 3. through Alertmanager's
//!    own webhook fan-out with the equivalent routing tree (the peer).
//! 4. Scale: route resolution per alert with 10 to 10,000 Webhooks, and `herald controller`'s
//!    initial sync and memory with 1,000 and 10,000 Webhooks in a real API server.
//!
//! Run it with `cargo run --release -p herald-bench` (add `-- --quick` for about a minute);
//! docs/benchmarks.md explains every figure.

mod cluster;
mod fixture;
mod forwarder;
mod load;
mod probe;
mod procs;
mod report;
mod sink;
mod suts;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
// The tests' PostgreSQL harness: a throwaway cluster on loopback.
use clap::{Parser, Subcommand};
use herald_testkit::postgres;

use crate::load::{Ingest, Load, Mode};
use crate::report::{Phase, Report, RouteRow, ScaleRow, SystemRow};
use crate::sink::Sink;
use crate::suts::{Shape, Sut};

#[derive(Parser)]
#[command(name = "herald-bench", about = "Loopback benchmark of Herald")]
struct Cli {
    #[command(subcommand)]
    command: Option<Sub>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Sub {
    /// The minimal forwarder (started by the benchmark itself).
    #[command(hide = true)]
    Forwarder(forwarder::ForwarderArgs),
    /// In-process probes for profiling.
    #[command(hide = true, subcommand)]
    Probe(probe::Probe),
}

#[derive(clap::Args, Clone, Debug)]
struct RunArgs {
    /// About a minute: short phases, scale with 1,000 Webhooks only.
    #[arg(long)]
    quick: bool,
    /// The herald binary; default: build it (`cargo build --release`) and use the one next to
    /// this executable.
    #[arg(long)]
    herald_bin: Option<PathBuf>,
    /// Fixed offered load, in alerts per second (each alert is 10 deliveries).
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    /// Seconds per load phase (default 10, 4 with --quick).
    #[arg(long)]
    duration: Option<u64>,
    /// Senders in the saturation phase.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Saturation rounds of Herald and the minimal forwarder, interleaved (default 5, 1 with
    /// --quick): each system's row shows its median round.
    #[arg(long)]
    rounds: Option<usize>,
    /// Alert deliveries accepted but not yet at the sinks, at most, in the saturation phase
    /// (Herald's default --max-pending).
    #[arg(long, default_value_t = 20_000)]
    max_outstanding: u64,
    /// Webhook counts for the controller scale runs (default 1000,10000; 1000 with --quick).
    #[arg(long, value_delimiter = ',')]
    scale: Option<Vec<usize>>,
    /// Longest wait for the controller's initial sync, in seconds (default 45, 20 with --quick).
    #[arg(long)]
    sync_limit: Option<u64>,
    /// Parts to run: throughput, alertmanager, routing, scale (default: all).
    #[arg(long, value_delimiter = ',')]
    only: Option<Vec<String>>,
    /// Systems of the throughput part to run, by short name: memory, data-dir, postgres,
    /// postgres-3, forwarder (default: all).
    #[arg(long, value_delimiter = ',')]
    systems: Option<Vec<String>>,
    /// Also write the Markdown report here.
    #[arg(long)]
    out: Option<PathBuf>,
}

impl RunArgs {
    fn wants(&self, part: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|parts| parts.iter().any(|p| p == part))
    }

    /// Whether the throughput part runs this system (see [`RunArgs::systems`]).
    fn runs(&self, system: &str) -> bool {
        let short = match system {
            HERALD => "memory",
            HERALD_DURABLE => "data-dir",
            HERALD_POSTGRES => "postgres",
            HERALD_POSTGRES_3 => "postgres-3",
            FORWARDER => "forwarder",
            _ => "alertmanager",
        };
        self.systems
            .as_ref()
            .is_none_or(|systems| systems.iter().any(|s| s == short))
    }

    fn phase_duration(&self) -> Duration {
        Duration::from_secs(self.duration.unwrap_or(if self.quick { 4 } else { 10 }))
    }

    fn rounds(&self) -> usize {
        self.rounds.unwrap_or(if self.quick { 1 } else { 5 }).max(1)
    }

    fn sync_limit(&self) -> Duration {
        Duration::from_secs(self.sync_limit.unwrap_or(if self.quick { 20 } else { 45 }))
    }

    /// Webhook counts for the controller scale runs.
    fn scale_sizes(&self) -> Vec<usize> {
        self.scale.clone().unwrap_or_else(|| {
            if self.quick {
                vec![1_000]
            } else {
                vec![1_000, 10_000]
            }
        })
    }

    fn drain_timeout(&self) -> Duration {
        Duration::from_secs(if self.quick { 10 } else { 15 })
    }
}

/// A system under test in the throughput part, with what was measured of it so far.
struct Running {
    name: &'static str,
    ingest: Ingest,
    sut: Sut,
    idle_rss: u64,
    /// The fixed-load phase.
    fixed: Phase,
    /// The saturation rounds, in order.
    saturation: Vec<Phase>,
}

/// The main throughput runs: 100 webhooks, each alert matching 10 of them.
const FAN_OUT: Shape = Shape {
    webhooks: 100,
    per_team: fixture::PER_TEAM,
};
/// The one-to-one runs: 10 webhooks, each alert matching one of them.
const ONE_TO_ONE: Shape = Shape {
    webhooks: 10,
    per_team: 1,
};
/// Herald in memory (its default).
const HERALD: &str = "Herald";
/// Herald with its durable store (`--data-dir`, the default of deploy/ and the chart).
const HERALD_DURABLE: &str = "Herald --data-dir";
/// Herald with the PostgreSQL store (`--database-url`), one replica, on a server of its own on
/// the same machine.
const HERALD_POSTGRES: &str = "Herald --database-url";
/// Three replicas of Herald on one PostgreSQL database, the load spread over them.
const HERALD_POSTGRES_3: &str = "Herald --database-url, 3 replicas";
/// The ceiling.
const FORWARDER: &str = "minimal forwarder";

/// Starts each system, measures it at the fixed load, then saturates Herald (both ways) and the
/// forwarder in interleaved rounds; returns a row per system.
#[allow(clippy::too_many_arguments)]
async fn throughput(
    args: &RunArgs,
    herald: &std::path::Path,
    work: &std::path::Path,
    sink: &Sink,
    shape: Shape,
    systems: &[(&'static str, Ingest)],
    postgres: Option<&postgres::Postgres>,
    phase_id: &mut u32,
) -> Result<Vec<SystemRow>> {
    // Every system is started and measured at the fixed load, then the saturation phase
    // runs in rounds, the systems taking turns (in alternating order), so that a slow minute
    // of this shared machine falls on all rather than on one.
    let mut running = Vec::new();
    for &(name, ingest) in systems {
        eprintln!("throughput ({} webhooks): {name}...", shape.webhooks);
        let mut sut = start_system(name, herald, work, sink, shape, postgres).await?;
        let idle_rss = sut.memory_kib().0;
        let mode = Mode::Fixed {
            alerts_per_second: args.rate,
        };
        let phase = measure(
            &mut sut,
            sink,
            ingest,
            mode,
            args,
            args.phase_duration(),
            shape,
            phase_id,
        )
        .await?;
        running.push(Running {
            name,
            ingest,
            sut,
            idle_rss,
            fixed: phase,
            saturation: Vec::new(),
        });
    }
    let rounds = args.rounds();
    for round in 0..rounds {
        let mut order: Vec<usize> = (0..running.len())
            // Alertmanager, far below the others, saturates once.
            .filter(|&i| round == 0 || running[i].name != "Alertmanager")
            .collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for i in order {
            let system = &mut running[i];
            eprintln!(
                "saturation ({} webhooks), round {} of {rounds}: {}...",
                shape.webhooks,
                round + 1,
                system.name
            );
            let mode = Mode::Saturate {
                concurrency: args.concurrency,
                max_outstanding: args.max_outstanding,
            };
            let phase = measure(
                &mut system.sut,
                sink,
                system.ingest,
                mode,
                args,
                args.phase_duration(),
                shape,
                phase_id,
            )
            .await?;
            system.saturation.push(phase);
        }
    }
    let mut rows = Vec::new();
    for Running {
        name,
        mut sut,
        idle_rss,
        fixed,
        mut saturation,
        ..
    } in running
    {
        let (_, peak) = sut.memory_kib();
        let rounds: Vec<f64> = saturation.iter().map(|p| p.deliveries_per_s).collect();
        // The median round stands for the system (the lower middle one of an even count).
        saturation.sort_by(|a, b| a.deliveries_per_s.total_cmp(&b.deliveries_per_s));
        let mut phases = vec![fixed];
        if !saturation.is_empty() {
            phases.push(saturation.swap_remove((saturation.len() - 1) / 2));
        }
        rows.push(SystemRow {
            name: name.to_string(),
            ready_after: sut.ready_after,
            idle_rss_kib: idle_rss,
            peak_rss_kib: peak,
            phases,
            saturation_rounds: rounds,
        });
        sut.stop(Duration::from_secs(5));
    }
    Ok(rows)
}

/// Starts one system of the throughput part, in a directory of its own under `work`.
async fn start_system(
    name: &str,
    herald: &std::path::Path,
    work: &std::path::Path,
    sink: &Sink,
    shape: Shape,
    postgres: Option<&postgres::Postgres>,
) -> Result<Sut> {
    let dir = work.join(format!(
        "{}-{}",
        name.replace([' ', '-', ','], ""),
        shape.webhooks
    ));
    std::fs::create_dir_all(&dir)?;
    let sink = sink.url();
    match name {
        HERALD => suts::start_herald(herald, &dir, shape, &sink, None, None).await,
        HERALD_DURABLE => {
            let data = dir.join("data");
            suts::start_herald(herald, &dir, shape, &sink, Some(&data), None).await
        }
        HERALD_POSTGRES | HERALD_POSTGRES_3 => {
            let server = postgres.context("no PostgreSQL server")?;
            let replicas = if name == HERALD_POSTGRES_3 { 3 } else { 1 };
            let database = format!("bench_{}_{replicas}", shape.webhooks);
            server.psql(&format!("CREATE DATABASE {database}"));
            let url = server.url_for(&database);
            let mut sut =
                suts::start_herald_replicas(herald, &dir, shape, &sink, &url, replicas).await?;
            sut.server_pid = postmaster_pid(server);
            Ok(sut)
        }
        FORWARDER => suts::start_forwarder(&dir, shape, &sink).await,
        _ => suts::start_alertmanager(&dir, shape.webhooks, &sink).await,
    }
}

/// The PostgreSQL server's main process (the first line of its `postmaster.pid`).
fn postmaster_pid(server: &postgres::Postgres) -> Option<u32> {
    let data = server.psql("SHOW data_directory");
    let pid_file =
        std::fs::read_to_string(std::path::Path::new(data.trim()).join("postmaster.pid")).ok()?;
    pid_file.lines().next()?.trim().parse().ok()
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Some(Sub::Forwarder(args)) => runtime.block_on(forwarder::run(args)),
        Some(Sub::Probe(probe)) => runtime.block_on(probe::run(probe)),
        None => runtime.block_on(bench(cli.run)),
    }
}

/// Builds the herald binary next to this one unless told which to use.
fn herald_binary(args: &RunArgs) -> Result<PathBuf> {
    if let Some(path) = &args.herald_bin {
        return Ok(path.clone());
    }
    let here = std::env::current_exe().context("locating herald-bench")?;
    let dir = here.parent().context("herald-bench's directory")?;
    if let Some(cargo) = std::env::var_os("CARGO") {
        eprintln!("building herald (cargo build --release -p herald -p herald-bench --bins)...");
        // The same package selection as `cargo run -p herald-bench` plus herald's binary, so
        // dependencies resolve to the same features and nothing is compiled twice.
        let mut build = Command::new(cargo);
        // `cargo run` gives this process its package's variables (CARGO_PKG_NAME, OUT_DIR, ...);
        // build scripts such as ring's rerun when those differ, so the inner build must not
        // see them, or it would rebuild half the dependency tree.
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy().into_owned();
            if name.starts_with("CARGO_PKG_")
                || name.starts_with("CARGO_MANIFEST_")
                || name.starts_with("CARGO_BIN_")
                || matches!(
                    name.as_str(),
                    "CARGO_CRATE_NAME"
                        | "CARGO_PRIMARY_PACKAGE"
                        | "CARGO_TARGET_TMPDIR"
                        | "OUT_DIR"
                )
            {
                build.env_remove(&name);
            }
        }
        let status = build
            .current_dir(cluster::repo_root())
            .args([
                "build",
                "--release",
                "-p",
                "herald",
                "-p",
                "herald-bench",
                "--bins",
            ])
            .status()
            .context("running cargo build")?;
        if !status.success() {
            bail!("cargo build --release failed");
        }
    }
    let path = dir.join("herald");
    if !path.is_file() {
        bail!(
            "{} not found: build it with `cargo build --release --bin herald` or pass --herald-bin",
            path.display()
        );
    }
    Ok(path)
}

async fn bench(args: RunArgs) -> Result<()> {
    let started = Instant::now();
    let herald = herald_binary(&args)?;
    let work = tempfile::Builder::new().prefix("herald-bench-").tempdir()?;
    let mut report = Report::new(&args.quick, &herald, args.rate, args.phase_duration());
    let sink = Sink::start().await?;
    let mut phase_id = 0u32;
    if args.wants("routing") {
        eprintln!("route resolution (in process)...");
        report.routes = route_resolution(if args.quick { 0.3 } else { 1.0 });
    }
    if args.wants("throughput") || args.wants("alertmanager") {
        throughput_part(
            &args,
            &herald,
            work.path(),
            &sink,
            &mut report,
            &mut phase_id,
        )
        .await?;
    }
    if args.wants("scale") {
        report.scale = scale(
            &args,
            &herald,
            &sink,
            work.path(),
            &args.scale_sizes(),
            &mut phase_id,
        )
        .await?;
    }
    report.total = started.elapsed();
    write_report(&report, args.out.as_deref())
}

/// The systems of the throughput part that were asked for, each with how alerts reach it.
fn throughput_systems(args: &RunArgs) -> Vec<(&'static str, Ingest)> {
    let mut systems = Vec::new();
    if args.wants("throughput") {
        for name in [
            HERALD,
            HERALD_DURABLE,
            HERALD_POSTGRES,
            HERALD_POSTGRES_3,
            FORWARDER,
        ]
        .into_iter()
        .filter(|name| args.runs(name))
        {
            systems.push((name, Ingest::AlertmanagerWebhook));
        }
    }
    if args.wants("alertmanager") {
        systems.push(("Alertmanager", Ingest::AlertmanagerApiV2));
    }
    systems
}

/// The throughput part: the fan-out shape with every system, then (with `throughput`) the
/// one-to-one shape without Alertmanager.
async fn throughput_part(
    args: &RunArgs,
    herald: &std::path::Path,
    work: &std::path::Path,
    sink: &Sink,
    report: &mut Report,
    phase_id: &mut u32,
) -> Result<()> {
    let systems = throughput_systems(args);
    let postgres = args.wants("throughput").then(postgres::Postgres::start);
    let postgres = postgres.as_ref();
    report.systems = throughput(
        args, herald, work, sink, FAN_OUT, &systems, postgres, phase_id,
    )
    .await?;
    if args.wants("throughput") {
        // One to one: ten webhooks, each alert for one of them (the shape in which a
        // per-webhook limit, rather than the global one, is met first).
        let systems: Vec<(&str, Ingest)> = systems
            .into_iter()
            .filter(|(name, _)| *name != "Alertmanager")
            .collect();
        report.one_to_one = throughput(
            args, herald, work, sink, ONE_TO_ONE, &systems, postgres, phase_id,
        )
        .await?;
    }
    report.alertmanager_version = suts::find_on_path("prometheus-alertmanager")
        .map(|p| suts::version(&p))
        .unwrap_or_default();
    Ok(())
}

/// Prints the report, and writes it to `out` when asked.
fn write_report(report: &Report, out: Option<&std::path::Path>) -> Result<()> {
    let text = report.markdown();
    println!("{text}");
    if let Some(out) = out {
        std::fs::write(out, &text).with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(())
}

/// One load phase against a running system (the next phase id); waits for the deliveries to
/// drain and prints a summary.
#[allow(clippy::too_many_arguments)]
async fn measure(
    sut: &mut Sut,
    sink: &Sink,
    ingest: Ingest,
    mode: Mode,
    args: &RunArgs,
    duration: Duration,
    shape: Shape,
    phase_id: &mut u32,
) -> Result<Phase> {
    *phase_id += 1;
    let phase_id = *phase_id;
    sut.check_alive()?;
    let stats = sink.stats.clone();
    stats.begin(phase_id);
    let cpu_before = sut.cpu_seconds();
    let server_cpu_before = sut.server_cpu_seconds();
    let outcome = load::run(
        Load {
            ingest,
            addrs: sut.addrs(),
            mode,
            duration,
            teams: shape.teams(),
            fanout: shape.per_team as u64,
            phase: phase_id,
        },
        stats.clone(),
    )
    .await;
    stats.end_window();
    let window_end = Instant::now();
    let expected = outcome.accepted_alerts() * shape.per_team as u64;
    let deadline = window_end + args.drain_timeout();
    while stats.alerts.load(std::sync::atomic::Ordering::Relaxed) < expected
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Anything beyond the expected count (duplicates) would show up here.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let drained = window_end.elapsed();
    let cpu = sut.cpu_seconds() - cpu_before;
    let server_cpu = sut
        .server_cpu_seconds()
        .zip(server_cpu_before)
        .map(|(after, before)| after - before);
    sut.check_alive()?;
    let mut phase = Phase::from_stats(mode, &outcome, &stats, expected, cpu, drained);
    phase.server_cpu_seconds = server_cpu;
    eprintln!("  {}", phase.summary());
    settle(&stats, expected).await;
    Ok(phase)
}

/// Waits, after a phase whose deliveries did not all arrive within the drain, until they have
/// or until none arrived for 2 s (at most a minute), so that a system still delivering does
/// not take the machine, and the sink, from the next phase (which would count them as stale).
/// The phase's figures are already taken: what arrives now stays lost in them.
async fn settle(stats: &sink::SinkStats, expected: u64) {
    use std::sync::atomic::Ordering::Relaxed;
    let started = Instant::now();
    let before = stats.alerts.load(Relaxed);
    let mut last = before;
    let mut quiet_since = Instant::now();
    while last < expected && started.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = stats.alerts.load(Relaxed);
        if now != last {
            last = now;
            quiet_since = Instant::now();
        } else if quiet_since.elapsed() >= Duration::from_secs(2) {
            break;
        }
    }
    if last > before || last < expected {
        eprintln!(
            "  after the drain: {} more arrived in {:.1} s, {} still missing",
            last - before,
            started.elapsed().as_secs_f64(),
            expected.saturating_sub(last)
        );
    }
}

/// Route resolution per alert, in process, for each size and layout.
fn route_resolution(seconds: f64) -> Vec<RouteRow> {
    use herald::routing::Subject;
    let mut rows = Vec::new();
    for layout in [fixture::Layout::ClusterWide, fixture::Layout::Tenants] {
        for webhooks in [10usize, 1_000, 10_000] {
            let built = Instant::now();
            let table = fixture::table(webhooks, layout);
            let build = built.elapsed();
            let alerts = fixture::alerts(layout, webhooks, 256);
            let matched = table.resolve(Subject::alert(&alerts[0])).len();
            // Five slices of the time; the median slice is reported, so that a moment when
            // this shared machine is busy elsewhere does not decide the figure.
            let mut slices = Vec::new();
            let mut total = 0usize;
            for _ in 0..5 {
                let started = Instant::now();
                let mut iterations = 0u64;
                while started.elapsed().as_secs_f64() < seconds / 5.0 {
                    for alert in &alerts {
                        total += std::hint::black_box(table.resolve(Subject::alert(alert))).len();
                    }
                    iterations += alerts.len() as u64;
                }
                slices.push(started.elapsed() / iterations.max(1) as u32);
            }
            slices.sort();
            let per_alert = slices[slices.len() / 2];
            std::hint::black_box(total);
            rows.push(RouteRow {
                layout: layout.name(),
                webhooks,
                matched,
                per_alert,
                build,
            });
        }
    }
    rows
}

async fn scale(
    args: &RunArgs,
    herald: &std::path::Path,
    sink: &Sink,
    dir: &std::path::Path,
    sizes: &[usize],
    phase_id: &mut u32,
) -> Result<Vec<ScaleRow>> {
    let mut rows = Vec::new();
    eprintln!("scale: starting etcd and kube-apiserver...");
    let (plane, client) = cluster::start_plane().await?;
    let mut created = 0usize;
    let mut sizes = sizes.to_vec();
    // Objects are only ever added: each size includes the previous ones.
    sizes.sort_unstable();
    sizes.dedup();
    for webhooks in sizes {
        eprintln!("scale: {webhooks} webhooks: creating objects...");
        let create_time = cluster::create_objects(&client, created, webhooks, &sink.url()).await?;
        created = webhooks;
        let controller =
            scale_controller(args, herald, &plane, sink, dir, webhooks, phase_id).await?;
        let standalone = scale_standalone(args, herald, sink, dir, webhooks, phase_id).await?;
        rows.push(ScaleRow {
            webhooks,
            create_time,
            sync_time: controller.sync_time,
            sync_limit: args.sync_limit(),
            progress: controller.progress,
            sync_cpu: controller.sync_cpu,
            ready_rss_kib: controller.ready_rss_kib,
            peak_rss_kib: controller.peak_rss_kib,
            phase: controller.phase,
            standalone_ready: standalone.ready_after,
            standalone_rss_kib: standalone.rss_kib,
            standalone_peak_kib: standalone.peak_kib,
            standalone_phase: standalone.phase,
        });
    }
    drop(client);
    tokio::task::spawn_blocking(move || drop(plane)).await?;
    Ok(rows)
}

/// The fixed load of the scale runs, at most 10 s.
fn scale_load(args: &RunArgs) -> (Mode, Duration) {
    let fixed = Mode::Fixed {
        alerts_per_second: args.rate,
    };
    (fixed, args.phase_duration().min(Duration::from_secs(10)))
}

/// What `herald controller` did with N webhooks in a real API server.
struct ControllerRun {
    sync_time: Option<Duration>,
    progress: Vec<(f64, u64, u64)>,
    sync_cpu: f64,
    ready_rss_kib: u64,
    peak_rss_kib: u64,
    /// The fixed load, once synced.
    phase: Option<Phase>,
}

/// `herald controller` syncing `webhooks` webhooks, then (if it synced) under the fixed load.
async fn scale_controller(
    args: &RunArgs,
    herald: &std::path::Path,
    plane: &cluster::ControlPlane,
    sink: &Sink,
    dir: &std::path::Path,
    webhooks: usize,
    phase_id: &mut u32,
) -> Result<ControllerRun> {
    eprintln!("scale: {webhooks} webhooks: herald controller...");
    let (fixed, load_duration) = scale_load(args);
    let started =
        cluster::start_controller(herald, plane, dir, webhooks, args.sync_limit()).await?;
    let sync_cpu = started.proc.cpu_seconds();
    let (ready_rss_kib, _) = started.proc.memory_kib();
    let progress = started.progress.clone();
    let sync_time = started.ready_after;
    let mut sut = Sut::single(
        started.proc,
        started.addr,
        started.ready_after.unwrap_or_default(),
    );
    let phase = match sync_time {
        Some(_) => {
            let shape = Shape {
                webhooks,
                per_team: fixture::PER_TEAM,
            };
            let ingest = Ingest::AlertmanagerWebhook;
            Some(
                measure(
                    &mut sut,
                    sink,
                    ingest,
                    fixed,
                    args,
                    load_duration,
                    shape,
                    phase_id,
                )
                .await?,
            )
        }
        None => {
            eprintln!(
                "  not synced after {:.0} s: {:?} (s, webhooks in table, ready)",
                args.sync_limit().as_secs_f64(),
                progress
            );
            None
        }
    };
    let (_, peak_rss_kib) = sut.proc.memory_kib();
    sut.proc.stop(Duration::from_secs(5));
    Ok(ControllerRun {
        sync_time,
        progress,
        sync_cpu,
        ready_rss_kib,
        peak_rss_kib,
        phase,
    })
}

/// What `herald run` did with N webhooks from files.
struct StandaloneRun {
    ready_after: Duration,
    rss_kib: u64,
    peak_kib: u64,
    phase: Phase,
}

/// `herald run` on `webhooks` webhooks under the fixed load.
async fn scale_standalone(
    args: &RunArgs,
    herald: &std::path::Path,
    sink: &Sink,
    dir: &std::path::Path,
    webhooks: usize,
    phase_id: &mut u32,
) -> Result<StandaloneRun> {
    eprintln!("scale: {webhooks} webhooks: herald run (standalone)...");
    let (fixed, load_duration) = scale_load(args);
    let dir = dir.join(format!("standalone-{webhooks}"));
    std::fs::create_dir_all(&dir)?;
    let shape = Shape {
        webhooks,
        per_team: fixture::PER_TEAM,
    };
    let mut standalone = suts::start_herald(herald, &dir, shape, &sink.url(), None, None).await?;
    let (rss_kib, _) = standalone.proc.memory_kib();
    let ingest = Ingest::AlertmanagerWebhook;
    let phase = measure(
        &mut standalone,
        sink,
        ingest,
        fixed,
        args,
        load_duration,
        shape,
        phase_id,
    )
    .await?;
    let (_, peak_kib) = standalone.proc.memory_kib();
    standalone.proc.stop(Duration::from_secs(5));
    Ok(StandaloneRun {
        ready_after: standalone.ready_after,
        rss_kib,
        peak_kib,
        phase,
    })
}
