//! The figures and the Markdown table they are printed as.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::load::{LoadOutcome, Mode};
use crate::sink::SinkStats;

/// One load phase against one system.
#[derive(Clone, Debug)]
pub struct Phase {
    pub mode: Mode,
    pub seconds: f64,
    pub sent_batches: u64,
    pub accepted_alerts_per_s: f64,
    /// Deliveries (POSTs at the sinks) per second inside the load window.
    pub deliveries_per_s: f64,
    /// Deliveries at the sinks in the whole phase, drain included.
    pub deliveries: u64,
    /// Alert deliveries at the sinks (equal to `deliveries` here: one alert per POST).
    pub alert_deliveries: u64,
    pub expected: u64,
    pub rejected: u64,
    pub errors: u64,
    pub behind: u64,
    pub stale: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub cpu_seconds: f64,
    /// CPU seconds of the system's own database server (PostgreSQL and its backends).
    pub server_cpu_seconds: Option<f64>,
    pub drain: Duration,
    /// TCP connections the sinks accepted during the phase.
    pub connections: u64,
}

impl Phase {
    pub fn from_stats(
        mode: Mode,
        outcome: &LoadOutcome,
        stats: &SinkStats,
        expected: u64,
        cpu_seconds: f64,
        drain: Duration,
    ) -> Phase {
        let seconds = outcome.elapsed.as_secs_f64();
        let latencies = stats.sorted_latencies();
        let pct = |p: f64| -> f64 {
            if latencies.is_empty() {
                return f64::NAN;
            }
            let i = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
            latencies[i] as f64 / 1e6
        };
        Phase {
            mode,
            seconds,
            sent_batches: outcome.batches_sent,
            accepted_alerts_per_s: outcome.accepted_alerts() as f64 / seconds,
            deliveries_per_s: stats.posts_in_window.load(Ordering::Relaxed) as f64 / seconds,
            deliveries: stats.posts.load(Ordering::Relaxed),
            alert_deliveries: stats.alerts.load(Ordering::Relaxed),
            expected,
            rejected: outcome.batches_rejected,
            errors: outcome.errors,
            behind: outcome.behind,
            stale: stats.stale.load(Ordering::Relaxed),
            p50_ms: pct(0.50),
            p99_ms: pct(0.99),
            max_ms: pct(1.0),
            cpu_seconds,
            server_cpu_seconds: None,
            drain,
            connections: stats.connections.load(Ordering::Relaxed),
        }
    }

    pub fn load_name(&self) -> String {
        match self.mode {
            Mode::Fixed { alerts_per_second } => format!("fixed {alerts_per_second:.0} alerts/s"),
            Mode::Saturate { .. } => "saturation".to_string(),
        }
    }

    /// CPU seconds per 1,000 deliveries.
    pub fn cpu_per_1000(&self) -> f64 {
        if self.deliveries == 0 {
            f64::NAN
        } else {
            self.cpu_seconds / self.deliveries as f64 * 1000.0
        }
    }

    /// The database server's CPU seconds per 1,000 deliveries, when it has one.
    pub fn server_cpu_per_1000(&self) -> Option<f64> {
        let cpu = self.server_cpu_seconds?;
        Some(if self.deliveries == 0 {
            f64::NAN
        } else {
            cpu / self.deliveries as f64 * 1000.0
        })
    }

    /// Alert deliveries lost: answered 200 but not delivered within the drain time.
    pub fn lost(&self) -> u64 {
        self.expected.saturating_sub(self.alert_deliveries)
    }

    pub fn summary(&self) -> String {
        format!(
            "{}: {} POSTs in {:.1} s, accepted {:.0} alerts/s, {:.0} deliveries/s, p50 {:.1} ms, p99 {:.1} ms, \
             max {:.1} ms, {:.3} CPU s/1k, lost {}, 503 {}, errors {}, behind {}, stale {}, drained in {:.1} s, \
             {} sink connections",
            self.load_name(),
            self.sent_batches,
            self.seconds,
            self.accepted_alerts_per_s,
            self.deliveries_per_s,
            self.p50_ms,
            self.p99_ms,
            self.max_ms,
            self.cpu_per_1000(),
            self.lost(),
            self.rejected,
            self.errors,
            self.behind,
            self.stale,
            self.drain.as_secs_f64(),
            self.connections,
        )
    }
}

/// One system of the throughput runs.
#[derive(Clone, Debug)]
pub struct SystemRow {
    pub name: String,
    pub ready_after: Duration,
    pub idle_rss_kib: u64,
    pub peak_rss_kib: u64,
    /// The fixed-load phase, then the median saturation round.
    pub phases: Vec<Phase>,
    /// Deliveries/s of every saturation round, in order.
    pub saturation_rounds: Vec<f64>,
}

impl SystemRow {
    fn saturation(&self) -> Option<&Phase> {
        self.phases
            .iter()
            .find(|p| matches!(p.mode, Mode::Saturate { .. }))
    }
}

/// Route resolution for one table.
#[derive(Clone, Debug)]
pub struct RouteRow {
    pub layout: &'static str,
    pub webhooks: usize,
    pub matched: usize,
    pub per_alert: Duration,
    pub build: Duration,
}

/// The controller with N webhooks.
#[derive(Clone, Debug)]
pub struct ScaleRow {
    pub webhooks: usize,
    pub create_time: Duration,
    /// Spawn to `/readyz`; `None` when not synced within `sync_limit`.
    pub sync_time: Option<Duration>,
    pub sync_limit: Duration,
    /// `(seconds, webhooks in the table, ready)` while syncing.
    pub progress: Vec<(f64, u64, u64)>,
    pub sync_cpu: f64,
    pub ready_rss_kib: u64,
    pub peak_rss_kib: u64,
    /// The fixed load against the synced controller.
    pub phase: Option<Phase>,
    pub standalone_ready: Duration,
    pub standalone_rss_kib: u64,
    pub standalone_peak_kib: u64,
    pub standalone_phase: Phase,
}

/// Everything measured in one run.
pub struct Report {
    pub quick: bool,
    pub herald: String,
    pub rate: f64,
    pub phase_duration: Duration,
    /// 100 webhooks, each alert for 10 of them.
    pub systems: Vec<SystemRow>,
    /// 10 webhooks, each alert for one of them.
    pub one_to_one: Vec<SystemRow>,
    pub routes: Vec<RouteRow>,
    pub scale: Vec<ScaleRow>,
    pub alertmanager_version: String,
    pub total: Duration,
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

fn ms(v: f64) -> String {
    if v.is_nan() {
        "–".into()
    } else if v < 10.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.0}")
    }
}

fn shell(cmd: &str) -> String {
    Command::new("sh")
        .args(["-c", cmd])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "**missed**" }
}

impl Report {
    pub fn new(quick: &bool, herald: &Path, rate: f64, phase_duration: Duration) -> Report {
        Report {
            quick: *quick,
            herald: herald.display().to_string(),
            rate,
            phase_duration,
            systems: Vec::new(),
            one_to_one: Vec::new(),
            routes: Vec::new(),
            scale: Vec::new(),
            alertmanager_version: String::new(),
            total: Duration::ZERO,
        }
    }

    /// One system's deliveries/s over another's, round by round (each pair measured back to
    /// back).
    fn ratios(rows: &[SystemRow], of: &str, to: &str) -> Vec<f64> {
        let rounds = |name: &str| {
            rows.iter()
                .find(|s| s.name == name)
                .map(|s| s.saturation_rounds.clone())
                .unwrap_or_default()
        };
        rounds(of)
            .iter()
            .zip(rounds(to))
            .map(|(h, f)| h / f)
            .collect()
    }

    /// The median of [`Report::ratios`] (the lower middle one of an even count).
    fn ratio(rows: &[SystemRow], of: &str, to: &str) -> Option<f64> {
        let mut ratios = Self::ratios(rows, of, to);
        ratios.sort_by(f64::total_cmp);
        ratios.get(ratios.len().checked_sub(1)? / 2).copied()
    }

    /// A throughput table and the comparisons under it.
    fn throughput_section(out: &mut String, title: &str, rows: &[SystemRow]) {
        if rows.is_empty() {
            return;
        }
        let _ = writeln!(out, "### {title}\n");
        let _ = writeln!(
            out,
            "| system | load | accepted alerts/s | deliveries/s | p50 ms | p99 ms | max ms | CPU s / 1k deliveries | PostgreSQL CPU s / 1k | lost | 503s | sink connections |"
        );
        let _ = writeln!(out, "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
        for system in rows {
            for phase in &system.phases {
                let server = phase
                    .server_cpu_per_1000()
                    .map_or_else(|| "–".to_string(), |cpu| format!("{cpu:.3}"));
                let _ = writeln!(
                    out,
                    "| {} | {} | {:.0} | {:.0} | {} | {} | {} | {:.3} | {server} | {} | {} | {} |",
                    system.name,
                    phase.load_name(),
                    phase.accepted_alerts_per_s,
                    phase.deliveries_per_s,
                    ms(phase.p50_ms),
                    ms(phase.p99_ms),
                    ms(phase.max_ms),
                    phase.cpu_per_1000(),
                    phase.lost(),
                    phase.rejected,
                    phase.connections,
                );
            }
        }
        Self::memory_table(out, rows);
        Self::comparisons(out, rows);
        Self::saturation_rounds(out, rows);
        out.push('\n');
    }

    /// Start-up time and memory of each system.
    fn memory_table(out: &mut String, rows: &[SystemRow]) {
        let _ = writeln!(
            out,
            "\n| system | ready after | RSS idle MiB | peak RSS MiB (VmHWM) |"
        );
        let _ = writeln!(out, "|---|--:|--:|--:|");
        for system in rows {
            let _ = writeln!(
                out,
                "| {} | {:.2} s | {} | {} |",
                system.name,
                system.ready_after.as_secs_f64(),
                mib(system.idle_rss_kib),
                mib(system.peak_rss_kib)
            );
        }
    }

    /// Each Herald variant against its reference: deliveries/s, CPU per delivery, latency.
    fn comparisons(out: &mut String, rows: &[SystemRow]) {
        let find = |name: &str| rows.iter().find(|s| s.name == name);
        out.push('\n');
        for (of, to, label) in [
            (
                "Herald",
                "minimal forwarder",
                "of the minimal forwarder's (the ceiling)",
            ),
            ("Herald", "Alertmanager", "of Alertmanager's (the peer)"),
            ("Herald --data-dir", "Herald", "of Herald in memory"),
            ("Herald --database-url", "Herald", "of Herald in memory"),
            (
                "Herald --database-url, 3 replicas",
                "Herald",
                "of one Herald in memory",
            ),
        ] {
            let (Some(h), Some(o)) = (
                find(of).and_then(SystemRow::saturation),
                find(to).and_then(SystemRow::saturation),
            ) else {
                continue;
            };
            let ratio = Self::ratio(rows, of, to)
                .filter(|_| to != "Alertmanager")
                .unwrap_or(h.deliveries_per_s / o.deliveries_per_s);
            let _ = writeln!(
                out,
                "- {of} at saturation: **{:.0}%** {label} deliveries/s ({:.0} vs {:.0}); \
                 CPU per delivery {:.2}x; p50 / p99 latency at the fixed load {} / {} vs {} / {} ms",
                100.0 * ratio,
                h.deliveries_per_s,
                o.deliveries_per_s,
                h.cpu_per_1000() / o.cpu_per_1000(),
                find(of).map(|s| ms(s.phases[0].p50_ms)).unwrap_or_default(),
                find(of).map(|s| ms(s.phases[0].p99_ms)).unwrap_or_default(),
                find(to).map(|s| ms(s.phases[0].p50_ms)).unwrap_or_default(),
                find(to).map(|s| ms(s.phases[0].p99_ms)).unwrap_or_default(),
            );
        }
    }

    /// Every saturation round, when there were several.
    fn saturation_rounds(out: &mut String, rows: &[SystemRow]) {
        let rounds: Vec<String> = rows
            .iter()
            .filter(|s| s.saturation_rounds.len() > 1)
            .map(|s| {
                let each: Vec<String> = s
                    .saturation_rounds
                    .iter()
                    .map(|d| format!("{d:.0}"))
                    .collect();
                format!("{} {}", s.name, each.join(" / "))
            })
            .collect();
        if !rounds.is_empty() {
            let ratios: Vec<String> = Self::ratios(rows, "Herald", "minimal forwarder")
                .iter()
                .map(|r| format!("{:.0}%", 100.0 * r))
                .collect();
            let _ = writeln!(
                out,
                "- Saturation rounds, interleaved (deliveries/s; each row above shows its \
                 system's median round): {}; Herald / forwarder per round: {} (the figure \
                 above is their median)",
                rounds.join("; "),
                ratios.join(" / ")
            );
        }
    }

    /// The throughput targets for one set of rows.
    fn throughput_targets(out: &mut String, shape: &str, rows: &[SystemRow]) {
        let find = |name: &str| rows.iter().find(|s| s.name == name);
        let saturation = |name: &str| find(name).and_then(SystemRow::saturation);
        if let (Some(h), Some(f)) = (saturation("Herald"), saturation("minimal forwarder")) {
            let ratio = Self::ratio(rows, "Herald", "minimal forwarder")
                .unwrap_or(h.deliveries_per_s / f.deliveries_per_s);
            let _ = writeln!(
                out,
                "| {shape}: Herald in memory ≥ 80% of the minimal forwarder's deliveries/s | {:.0}% | {} |",
                ratio * 100.0,
                verdict(ratio >= 0.8)
            );
        }
        if let (Some(d), Some(m)) = (saturation("Herald --data-dir"), saturation("Herald")) {
            let ratio = Self::ratio(rows, "Herald --data-dir", "Herald")
                .unwrap_or(d.deliveries_per_s / m.deliveries_per_s);
            let cpu = d.cpu_per_1000() / m.cpu_per_1000();
            let _ = writeln!(
                out,
                "| {shape}: durable ≥ 70% of in-memory deliveries/s at saturation | {:.0}% | {} |",
                ratio * 100.0,
                verdict(ratio >= 0.7)
            );
            let _ = writeln!(
                out,
                "| {shape}: durable CPU per delivery ≤ 1.5x in-memory | {cpu:.2}x | {} |",
                verdict(cpu <= 1.5)
            );
        }
        if let (Some(p), Some(m)) = (saturation("Herald --database-url"), saturation("Herald")) {
            let ratio = Self::ratio(rows, "Herald --database-url", "Herald")
                .unwrap_or(p.deliveries_per_s / m.deliveries_per_s);
            let _ = writeln!(
                out,
                "| {shape}: one replica on PostgreSQL ≥ 50% of in-memory deliveries/s | {:.0}% | {} |",
                ratio * 100.0,
                verdict(ratio >= 0.5)
            );
        }
        if let Some(fixed) = find("Herald --data-dir").map(|s| &s.phases[0]) {
            let _ = writeln!(
                out,
                "| {shape}: durable p99 at the fixed load < 20 ms | {} ms | {} |",
                ms(fixed.p99_ms),
                verdict(fixed.p99_ms < 20.0)
            );
        }
        let lost: u64 = rows
            .iter()
            .filter(|s| s.name.starts_with("Herald"))
            .flat_map(|s| &s.phases)
            .map(Phase::lost)
            .sum();
        if rows.iter().any(|s| s.name.starts_with("Herald")) {
            let _ = writeln!(
                out,
                "| {shape}: Herald lost = 0 (answered 200, never arrived) | {lost} | {} |",
                verdict(lost == 0)
            );
        }
    }

    /// The whole report: the run's header, then each part that was measured, then the targets.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        self.header(&mut out);
        Self::throughput_section(
            &mut out,
            "1-3. Throughput and latency (100 webhooks, each alert for 10)",
            &self.systems,
        );
        Self::throughput_section(
            &mut out,
            "1b. Throughput and latency (10 webhooks, each alert for one)",
            &self.one_to_one,
        );
        self.routes_section(&mut out);
        self.scale_section(&mut out);
        self.targets_section(&mut out);
        out
    }

    /// The machine, the binary and the load.
    fn header(&self, out: &mut String) {
        let root = crate::cluster::repo_root();
        let root = root.display();
        let _ = writeln!(
            out,
            "## herald-bench results{}\n",
            if self.quick { " (--quick)" } else { "" }
        );
        let _ = writeln!(
            out,
            "- machine: `nproc` = {}, {}; kernel {}",
            shell("nproc"),
            shell("lscpu | sed -n 's/^Model name: *//p' | head -1"),
            shell("uname -r"),
        );
        let uncommitted = !shell(&format!(
            "git -C {root} status --porcelain -- src Cargo.toml"
        ))
        .is_empty();
        let _ = writeln!(
            out,
            "- herald: {} (git {}{})",
            self.herald,
            shell(&format!("git -C {root} rev-parse --short HEAD")),
            if uncommitted {
                ", with uncommitted changes"
            } else {
                ""
            },
        );
        if !self.alertmanager_version.is_empty() {
            let _ = writeln!(out, "- peer: {}", self.alertmanager_version);
        }
        let _ = writeln!(
            out,
            "- load: POSTs of 10 alerts; each alert matches 10 of 100 webhooks (1 alert per delivery); \
             fixed load {:.0} alerts/s = {:.0} deliveries/s; saturation = 4 closed-loop senders, \
             at most 20,000 deliveries outstanding; {} s per phase; total run {:.0} s\n",
            self.rate,
            self.rate * 10.0,
            self.phase_duration.as_secs(),
            self.total.as_secs_f64()
        );
    }

    /// Route resolution per alert, by table size and layout.
    fn routes_section(&self, out: &mut String) {
        if self.routes.is_empty() {
            return;
        }
        let _ = writeln!(
            out,
            "### 4a. Route resolution per alert (in process, `Table::resolve`)\n"
        );
        let _ = writeln!(
            out,
            "| layout | webhooks + conditions | matched per alert | µs per alert | table build ms |"
        );
        let _ = writeln!(out, "|---|--:|--:|--:|--:|");
        for row in &self.routes {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {:.2} | {:.1} |",
                row.layout,
                row.webhooks,
                row.matched,
                row.per_alert.as_secs_f64() * 1e6,
                row.build.as_secs_f64() * 1e3
            );
        }
        out.push('\n');
    }

    /// The controller and `herald run` with many webhooks.
    fn scale_section(&self, out: &mut String) {
        if self.scale.is_empty() {
            return;
        }
        let _ = writeln!(
            out,
            "### 4b. Scale: herald controller on a real API server, and herald run\n"
        );
        let _ = writeln!(
            out,
            "| webhooks + conditions | objects created in | controller sync (spawn → /readyz) | controller CPU s in sync | controller RSS at sync MiB | controller peak RSS MiB | controller deliveries/s | p50 / p99 ms | `herald run` ready | `herald run` RSS loaded MiB | `herald run` peak RSS under load MiB | `herald run` deliveries/s | p50 / p99 ms |"
        );
        let _ = writeln!(out, "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
        for row in &self.scale {
            Self::scale_row(out, row);
        }
        for row in self.scale.iter().filter(|r| r.sync_time.is_none()) {
            let points: Vec<String> = row
                .progress
                .iter()
                .map(|(t, total, ready)| format!("{t:.0} s: {total}/{ready}"))
                .collect();
            let _ = writeln!(
                out,
                "\n- controller with {} webhooks, webhooks in table / ready while syncing: {}",
                row.webhooks,
                points.join(", ")
            );
        }
        out.push('\n');
    }

    /// One line of the scale table.
    fn scale_row(out: &mut String, row: &ScaleRow) {
        let sync = match row.sync_time {
            Some(t) => format!("{:.2} s", t.as_secs_f64()),
            None => {
                let (_, total, ready) = row.progress.last().copied().unwrap_or_default();
                format!(
                    "**not synced after {:.0} s** ({total} in table, {ready} ready)",
                    row.sync_limit.as_secs_f64()
                )
            }
        };
        let (rate, lat) = match &row.phase {
            Some(p) => (
                format!("{:.0}", p.deliveries_per_s),
                format!("{} / {}", ms(p.p50_ms), ms(p.p99_ms)),
            ),
            None => ("–".into(), "–".into()),
        };
        let s = &row.standalone_phase;
        let _ = writeln!(
            out,
            "| {} | {:.1} s | {} | {:.1} | {} | {} | {} | {} | {:.2} s | {} | {} | {:.0} | {} / {} |",
            row.webhooks,
            row.create_time.as_secs_f64(),
            sync,
            row.sync_cpu,
            mib(row.ready_rss_kib),
            mib(row.peak_rss_kib),
            rate,
            lat,
            row.standalone_ready.as_secs_f64(),
            mib(row.standalone_rss_kib),
            mib(row.standalone_peak_kib),
            s.deliveries_per_s,
            ms(s.p50_ms),
            ms(s.p99_ms),
        );
    }

    /// Every target with its figure and whether it was met.
    fn targets_section(&self, out: &mut String) {
        let _ = writeln!(out, "### Targets (measured, not asserted)\n");
        let _ = writeln!(out, "| target | measured | |\n|---|---|---|");
        Self::throughput_targets(out, "100 webhooks", &self.systems);
        Self::throughput_targets(out, "10 webhooks", &self.one_to_one);
        if let Some(r) = self
            .routes
            .iter()
            .filter(|r| r.webhooks == 10_000)
            .max_by_key(|r| r.per_alert)
        {
            let us = r.per_alert.as_secs_f64() * 1e6;
            let _ = writeln!(
                out,
                "| route resolution < 20 µs per alert at 10,000 webhooks | {us:.1} µs ({}) | {} |",
                r.layout,
                verdict(us < 20.0)
            );
        }
        if let Some(r) = self.scale.iter().find(|r| r.webhooks == 10_000) {
            let peak = r.peak_rss_kib.max(r.standalone_peak_kib) as f64 / 1024.0;
            let _ = writeln!(
                out,
                "| peak RSS < 64 MiB with 10,000 webhooks, loaded and under load | controller {} MiB{}, herald run {} MiB | {} |",
                mib(r.peak_rss_kib),
                if r.sync_time.is_none() {
                    " (still syncing, no load)"
                } else {
                    ""
                },
                mib(r.standalone_peak_kib),
                verdict(peak < 64.0)
            );
        }
    }
}
