//! The `herald` command line: thin wrappers over the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

use crate::alert;
use crate::delivery::{EngineConfig, RetryPolicy};
use crate::dispatch::Dispatcher;
use crate::object::ObjectKey;
use crate::outgoing::ReportOutcome;
use crate::receiver::{self, ReceiverConfig};
use crate::routing::Subject;
use crate::secret::Sensitive;
use crate::standalone::{self, DEFAULT_NAMESPACE, Loader, Manifests};
use crate::store::{RecordLimits, Store};

/// Herald turns Alertmanager alerts and cluster events into webhook notifications.
#[derive(Debug, Parser)]
#[command(name = "herald", version, about)]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "HERALD_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// How logs are written (to standard error).
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Herald's commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// The Kubernetes operator: watch Webhooks, NotificationConditions and Secrets, receive, deliver.
    Controller(Box<ControllerArgs>),
    /// Receive and deliver without Kubernetes, from manifests in a folder (reloaded on change).
    Run(Box<RunArgs>),
    /// Validate manifests offline with the API server's rules and print the routing table.
    Check(CheckArgs),
    /// Print which webhooks each alert in a file would reach, and why not the others.
    Route(RouteArgs),
    /// Print the CustomResourceDefinitions (the content of `crds/`).
    Crdgen,
    /// Send a test message to one webhook and print the outcome.
    Test(TestArgs),
    /// List delivery records from a running Herald, or replay one.
    Deliveries(DeliveriesArgs),
    /// Render custom templates for a running Herald (started by it, one JSON line each way).
    #[command(hide = true)]
    TemplateWorker {
        /// The worker's data size limit, in MiB.
        #[arg(long, default_value_t = DEFAULT_TEMPLATE_MEMORY_MIB)]
        memory_limit_mib: u64,
    },
}

/// The memory a template worker process may use, in MiB.
const DEFAULT_TEMPLATE_MEMORY_MIB: u64 = 64;

/// Renders custom templates in worker processes (this binary) with a memory limit.
fn template_workers(memory_limit_mib: u64) {
    match std::env::current_exe() {
        Ok(program) => crate::template::use_workers(program, memory_limit_mib),
        Err(e) => tracing::warn!(
            "cannot find Herald's own binary ({e}): custom templates render in-process, without a memory limit"
        ),
    }
}

/// `herald deliveries`.
#[derive(Debug, Args)]
pub struct DeliveriesArgs {
    /// Only this webhook (`NAMESPACE/NAME`).
    #[arg(long)]
    pub webhook: Option<String>,
    /// Only finally failed deliveries.
    #[arg(long)]
    pub failed: bool,
    /// Only this outcome: Succeeded, Failed or Dropped.
    #[arg(long, conflicts_with = "failed")]
    pub outcome: Option<String>,
    /// At most this many, newest first.
    #[arg(long, default_value_t = 50)]
    pub limit: usize,
    /// Herald's admin listener.
    #[arg(
        long,
        default_value = "http://127.0.0.1:8081",
        env = "HERALD_ADMIN_URL"
    )]
    pub server: String,
    /// A file holding the admin API's bearer token (Herald's `--admin-token-file`).
    #[arg(long, env = "HERALD_ADMIN_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Replay instead of listing.
    #[command(subcommand)]
    pub action: Option<DeliveriesAction>,
}

/// What `herald deliveries` can do besides listing.
#[derive(Debug, Subcommand)]
pub enum DeliveriesAction {
    /// Send a recorded delivery again (new attempt, same Idempotency-Key).
    Replay {
        /// The delivery id.
        id: String,
    },
}

/// Settings shared by every command that routes and delivers.
#[derive(Debug, Args)]
pub struct CoreArgs {
    /// Deliveries accepted and not finished per webhook (its backlog); past it, further
    /// deliveries to that webhook become dead letters (kept with their content, replayable).
    /// Without --data-dir a webhook's backlog is also held to half of --max-pending.
    #[arg(long, default_value_t = 100_000)]
    pub backlog_limit: usize,
    /// Deliveries held in memory across all webhooks. Without --data-dir: every accepted and
    /// unfinished delivery, past which the receiver answers 503. With --data-dir: the part of
    /// the backlogs loaded to feed the workers (the rest waits on disk), and the deliveries
    /// waiting to be written, past which the receiver answers 503.
    #[arg(long, default_value_t = 20_000)]
    pub max_pending: usize,
    /// Delay before the first retry.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub retry_initial_backoff: Duration,
    /// Longest delay between retries.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub retry_max_backoff: Duration,
    /// How long a delivery is retried before it fails.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub retry_max_elapsed: Duration,
    /// Most attempts per delivery.
    #[arg(long, default_value_t = 30)]
    pub retry_max_attempts: u32,
    /// Keep accepted deliveries and delivery records on disk here (crash-safe); in memory when unset.
    #[arg(long, env = "HERALD_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Keep accepted deliveries and delivery records in PostgreSQL, one queue shared by every
    /// replica (`postgres://user:password@host/db?sslmode=require`). Prefer
    /// --database-url-file: a password on a command line is visible to every process.
    #[arg(long, env = "HERALD_DATABASE_URL", hide_env_values = true, value_parser = parse_database_url,
          conflicts_with_all = ["data_dir", "database_url_file"])]
    pub database_url: Option<DatabaseUrl>,
    /// A file holding the PostgreSQL connection string (a mounted Secret).
    #[arg(long, env = "HERALD_DATABASE_URL_FILE", conflicts_with = "data_dir")]
    pub database_url_file: Option<PathBuf>,
    /// CA certificates (PEM) trusted for TLS to PostgreSQL, besides the public roots.
    #[arg(long, env = "HERALD_DATABASE_CA_FILE")]
    pub database_ca_file: Option<PathBuf>,
    /// Connections to PostgreSQL per replica.
    #[arg(long, default_value_t = 8)]
    pub database_pool_size: usize,
    /// How long a replica's claim on a delivery lasts without renewal (renewed every third of
    /// it): a replica that stops (killed, paused, cut off) loses its claims this long after.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub database_lease: Duration,
    /// The admin listener (delivery records and replay); keep it on loopback unless protected.
    #[arg(long, default_value = "127.0.0.1:8081")]
    pub admin_listen: SocketAddr,
    /// A file holding the bearer token admin API callers must send (none when unset).
    #[arg(long, env = "HERALD_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// A host name admin API callers may use in `Host` besides addresses and `localhost`
    /// (e.g. a Service name); repeatable.
    #[arg(long = "admin-host", value_name = "NAME")]
    pub admin_hosts: Vec<String>,
    /// Keep the content of every delivery in its record, not only of dead letters.
    #[arg(long)]
    pub record_bodies: bool,
    /// Succeeded deliveries recorded per webhook.
    #[arg(long, default_value_t = 100)]
    pub records_per_webhook: usize,
    /// Failed and dropped deliveries (dead letters) recorded per webhook.
    #[arg(long, default_value_t = 1000)]
    pub dead_letters_per_webhook: usize,
    /// Delivery records kept in all (successes and dead letters, oldest dropped first).
    #[arg(long, default_value_t = 50_000)]
    pub max_records: usize,
    /// Accepted for compatibility: link-local and metadata destinations are always refused.
    #[arg(long, hide = true)]
    pub deny_link_local: bool,
    /// Let webhooks reach loopback addresses (127.0.0.0/8, ::1). Default: true for `herald
    /// run`, false for `herald controller`. Herald's own listeners stay unreachable.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub allow_loopback: Option<bool>,
    /// A destination webhooks may reach, `[NAMESPACE=]CIDR|ADDRESS|HOST|*.DOMAIN`; repeatable.
    /// Once allow rules apply to a namespace, its webhooks reach only what they allow.
    /// An allow rule also opens an internal range it names (e.g. 127.0.0.0/8).
    #[arg(long = "allow-destination", value_name = "RULE")]
    pub allow_destinations: Vec<crate::delivery::DestinationRule>,
    /// A destination no webhook may reach, `[NAMESPACE=]CIDR|ADDRESS|HOST|*.DOMAIN`;
    /// repeatable. Deny rules win over allow rules.
    #[arg(long = "deny-destination", value_name = "RULE")]
    pub deny_destinations: Vec<crate::delivery::DestinationRule>,
    /// Memory each template worker process may use, in MiB (custom templates render in two
    /// such processes; one that exceeds it is ended and its delivery fails).
    #[arg(long, default_value_t = DEFAULT_TEMPLATE_MEMORY_MIB)]
    pub template_memory_mib: u64,
    /// Use only Secrets labelled or annotated `herald.dev/use: "true"` (ServiceAccount token
    /// Secrets are refused either way).
    #[arg(long)]
    pub require_secret_consent: bool,
}

/// A database connection string: kept out of `Debug` output (it may hold a password).
#[derive(Clone)]
pub struct DatabaseUrl(pub String);

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DatabaseUrl(..)")
    }
}

fn parse_database_url(text: &str) -> Result<DatabaseUrl, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("the database URL is empty".into());
    }
    Ok(DatabaseUrl(text.to_string()))
}

impl CoreArgs {
    /// The PostgreSQL settings, when a database is configured.
    fn postgres_options(&self) -> anyhow::Result<Option<crate::store::PostgresOptions>> {
        let url = match (&self.database_url, &self.database_url_file) {
            (Some(url), _) => url.0.clone(),
            (None, Some(file)) => std::fs::read_to_string(file)
                .with_context(|| format!("reading the database URL from {}", file.display()))?
                .trim()
                .to_string(),
            (None, None) => return Ok(None),
        };
        let mut options = crate::store::PostgresOptions::new(url);
        if let Some(file) = &self.database_ca_file {
            options.ca_pem = std::fs::read(file)
                .with_context(|| format!("reading the database CA from {}", file.display()))?;
        }
        options.pool_size = self.database_pool_size.max(2);
        options.lease = self.database_lease.max(Duration::from_secs(1));
        Ok(Some(options))
    }

    fn engine_config(&self) -> EngineConfig {
        EngineConfig {
            backlog_limit: self.backlog_limit,
            max_pending: self.max_pending,
            retry: RetryPolicy {
                initial_backoff: self.retry_initial_backoff,
                max_backoff: self.retry_max_backoff,
                max_elapsed: self.retry_max_elapsed,
                max_attempts: self.retry_max_attempts.max(1),
            },
        }
    }

    /// The rules targets are built under; `loopback` is the command's default for
    /// `--allow-loopback`.
    fn policy(&self, loopback: bool) -> crate::delivery::TargetPolicy {
        crate::delivery::TargetPolicy {
            destinations: crate::delivery::DestinationPolicy::new(
                self.allow_destinations.clone(),
                self.deny_destinations.clone(),
                self.allow_loopback.unwrap_or(loopback),
            ),
            require_secret_consent: self.require_secret_consent,
        }
    }

    async fn dispatcher(
        &self,
        cluster_namespaces: &[String],
        loopback: bool,
    ) -> anyhow::Result<Dispatcher> {
        template_workers(self.template_memory_mib);
        let limits = RecordLimits {
            per_webhook: self.records_per_webhook,
            dead_letters: self.dead_letters_per_webhook,
            record_bodies: self.record_bodies,
            total: self.max_records,
        };
        let store = match (self.postgres_options()?, &self.data_dir) {
            (Some(options), _) => Store::postgres(options, limits)
                .await
                .context("opening the delivery store in PostgreSQL")?,
            (None, Some(dir)) => Store::open(dir, limits)
                .with_context(|| format!("opening the delivery store in {}", dir.display()))?,
            (None, None) => Store::memory(limits),
        };
        Ok(Dispatcher::with_store(
            cluster_namespaces.iter().cloned(),
            self.engine_config(),
            std::sync::Arc::new(store),
        )
        .with_policy(self.policy(loopback)))
    }

    /// Serves the admin router until `cancel` fires.
    async fn serve_admin(
        &self,
        dispatcher: &Dispatcher,
        cancel: CancellationToken,
    ) -> anyhow::Result<tokio::task::JoinHandle<()>> {
        let listener = tokio::net::TcpListener::bind(self.admin_listen)
            .await
            .with_context(|| format!("binding the admin listener to {}", self.admin_listen))?;
        dispatcher
            .policy()
            .destinations
            .add_own_listener(listener.local_addr().unwrap_or(self.admin_listen));
        tracing::info!(address = %self.admin_listen, durable = dispatcher.engine().store().is_durable(), "admin listener (delivery records)");
        let access = crate::admin::AdminAccess {
            token: read_token(&self.admin_token_file, "admin")?,
            hosts: self.admin_hosts.clone(),
        };
        let router = crate::admin::router(dispatcher.engine().clone(), access);
        Ok(tokio::spawn(async move {
            if let Err(e) =
                receiver::serve(listener, router, async move { cancel.cancelled().await }).await
            {
                tracing::error!("admin listener: {e}");
            }
        }))
    }
}

/// `herald run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Folder of Webhook, NotificationCondition and Secret manifests.
    #[arg(long)]
    pub config: PathBuf,
    /// Receiver address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Namespaces whose webhooks may receive any alert (see Tenancy); repeatable.
    #[arg(long = "cluster-namespace", default_value = DEFAULT_NAMESPACE)]
    pub cluster_namespaces: Vec<String>,
    /// Receiver settings.
    #[command(flatten)]
    pub receiver: ReceiverArgs,
    /// How often the folder is checked for changes.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub reload_interval: Duration,
    /// How long shutdown waits for deliveries in flight.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_timeout: Duration,
    /// Routing and delivery settings.
    #[command(flatten)]
    pub core: CoreArgs,
    /// Web console settings.
    #[command(flatten)]
    pub console: ConsoleArgs,
}

/// The web console (the WebHook settings page), off unless `--console-listen` is set.
#[derive(Debug, Args)]
pub struct ConsoleArgs {
    /// Serve the web console on this address (off when unset).
    #[arg(long, env = "HERALD_CONSOLE_LISTEN")]
    pub console_listen: Option<SocketAddr>,
    /// `herald run`: a file holding the token that signs in to the console (required with
    /// --console-listen). In a cluster users sign in with their own Kubernetes token instead.
    #[arg(long, env = "HERALD_CONSOLE_TOKEN_FILE")]
    pub console_token_file: Option<PathBuf>,
}

impl ConsoleArgs {
    /// Serves `router` on --console-listen until `cancel` fires.
    async fn serve(
        &self,
        dispatcher: &Dispatcher,
        router: axum::Router,
        cancel: CancellationToken,
    ) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
        let Some(address) = self.console_listen else {
            return Ok(None);
        };
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .with_context(|| format!("binding the console listener to {address}"))?;
        let local = listener.local_addr().unwrap_or(address);
        dispatcher.policy().destinations.add_own_listener(local);
        tracing::info!(address = %local, "web console listening");
        Ok(Some(tokio::spawn(async move {
            if let Err(e) =
                receiver::serve(listener, router, async move { cancel.cancelled().await }).await
            {
                tracing::error!("console listener: {e}");
            }
        })))
    }
}

/// Receiver settings shared by `run` and `controller`.
#[derive(Debug, Args)]
pub struct ReceiverArgs {
    /// A file holding the bearer token callers must send (no authentication when unset).
    #[arg(long, env = "HERALD_RECEIVER_TOKEN_FILE")]
    pub receiver_token_file: Option<PathBuf>,
    /// Largest accepted request body, in bytes.
    #[arg(long, default_value_t = alert::DEFAULT_BODY_LIMIT)]
    pub body_limit: usize,
    /// How long a request waits for room when --max-pending deliveries are pending, before
    /// the receiver answers 503 (0s: at once).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub overload_wait: Duration,
    /// Serve `/metrics` on this address instead of the receiver's (which then has none).
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// Most alerts one request may carry; more refuse the request.
    #[arg(long, default_value_t = alert::PayloadLimits::default().max_alerts)]
    pub max_alerts: usize,
    /// Most labels (and, separately, annotations) one alert may have; more refuse that alert.
    #[arg(long, default_value_t = alert::PayloadLimits::default().max_labels)]
    pub max_labels: usize,
    /// Longest label or annotation name, in bytes; a longer one refuses its alert.
    #[arg(long, default_value_t = alert::PayloadLimits::default().max_name_bytes)]
    pub max_label_name_bytes: usize,
    /// Longest label or annotation value, in bytes; a longer one refuses its alert, not the
    /// request. Defaults to --body-limit.
    #[arg(long)]
    pub max_label_value_bytes: Option<usize>,
}

impl ReceiverArgs {
    fn config(&self) -> anyhow::Result<ReceiverConfig> {
        Ok(ReceiverConfig {
            body_limit: self.body_limit,
            // Read once now so a wrong path fails at start; then re-read whenever it changes.
            token: read_token(&self.receiver_token_file, "receiver")?,
            token_file: self.receiver_token_file.clone(),
            overload_wait: self.overload_wait,
            serve_metrics: self.metrics_listen.is_none(),
            payload: alert::PayloadLimits {
                max_alerts: self.max_alerts,
                max_labels: self.max_labels,
                max_name_bytes: self.max_label_name_bytes,
                max_value_bytes: self.max_label_value_bytes.unwrap_or(self.body_limit),
            },
            ..ReceiverConfig::default()
        })
    }

    /// Serves `/metrics` on its own listener until `cancel` fires, when one is asked for.
    async fn serve_metrics(
        &self,
        dispatcher: &Dispatcher,
        cancel: CancellationToken,
    ) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
        let Some(address) = self.metrics_listen else {
            return Ok(None);
        };
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .with_context(|| format!("binding the metrics listener to {address}"))?;
        if let Ok(local) = listener.local_addr() {
            dispatcher.policy().destinations.add_own_listener(local);
        }
        tracing::info!(address = %address, "metrics listener");
        let router = receiver::metrics_router(dispatcher.clone());
        Ok(Some(tokio::spawn(async move {
            if let Err(e) =
                receiver::serve(listener, router, async move { cancel.cancelled().await }).await
            {
                tracing::error!("metrics listener: {e}");
            }
        })))
    }
}

/// `herald controller`.
#[derive(Debug, Args)]
pub struct ControllerArgs {
    /// Kubeconfig file; in a cluster the pod's service account is used.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Receiver address.
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// The namespace Herald runs in (its Lease lives there).
    #[arg(long, env = "POD_NAMESPACE", default_value = "herald")]
    pub namespace: String,
    /// Namespaces whose webhooks may receive any alert; repeatable. Default: --namespace.
    #[arg(long = "cluster-namespace")]
    pub cluster_namespaces: Vec<String>,
    /// Watch only these namespaces; repeatable. Default: every namespace.
    #[arg(long = "watch-namespace")]
    pub watch_namespaces: Vec<String>,
    /// Elect one replica to write status, publish Events and send tests.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_election: bool,
    /// Name of the leader election Lease.
    #[arg(long, default_value = "herald-leader")]
    pub lease_name: String,
    /// This replica's identity; the pod name in a cluster.
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Watch Kubernetes Events (events.k8s.io) and deliver them to `Events` webhooks.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub events: bool,
    /// Shortest time between two status writes of one webhook.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub status_interval: Duration,
    /// How long shutdown waits for deliveries in flight.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_timeout: Duration,
    /// Receiver settings.
    #[command(flatten)]
    pub receiver: ReceiverArgs,
    /// Routing and delivery settings.
    #[command(flatten)]
    pub core: CoreArgs,
    /// Web console settings.
    #[command(flatten)]
    pub console: ConsoleArgs,
}

/// `herald check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Folder of manifests.
    pub dir: PathBuf,
    /// Namespaces whose webhooks may receive any alert; repeatable.
    #[arg(long = "cluster-namespace", default_value = DEFAULT_NAMESPACE)]
    pub cluster_namespaces: Vec<String>,
}

/// `herald route`.
#[derive(Debug, Args)]
pub struct RouteArgs {
    /// Folder of manifests.
    #[arg(long)]
    pub config: PathBuf,
    /// An Alertmanager webhook payload or an API v2 alert array.
    #[arg(long)]
    pub alerts: PathBuf,
    /// Namespaces whose webhooks may receive any alert; repeatable.
    #[arg(long = "cluster-namespace", default_value = DEFAULT_NAMESPACE)]
    pub cluster_namespaces: Vec<String>,
}

/// `herald test`.
#[derive(Debug, Args)]
pub struct TestArgs {
    /// The webhook's name.
    pub name: String,
    /// The webhook's namespace.
    #[arg(short = 'n', long, default_value = DEFAULT_NAMESPACE)]
    pub namespace: String,
    /// Folder of manifests: send directly, without a cluster.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Kubeconfig file (cluster mode).
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// How long to wait for the controller's answer (cluster mode).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// Parses the command line and runs the command.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::TemplateWorker { memory_limit_mib } = cli.command {
        return crate::template::worker_main(memory_limit_mib);
    }
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        // No colours: every control character in a text line is escaped, so that nothing an
        // endpoint answers can forge a log line or a terminal sequence.
        LogFormat::Text => builder
            .with_ansi(false)
            .with_writer(|| EscapingWriter(std::io::stderr()))
            .init(),
        LogFormat::Json => builder.with_writer(std::io::stderr).json().init(),
    }
}

/// Writes log lines with their control characters (CR, ESC, inner LF, ...) escaped; the line's
/// own final newline stays.
pub struct EscapingWriter<W>(pub W);

impl<W: std::io::Write> std::io::Write for EscapingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let (body, end) = match buf.split_last() {
            Some((b'\n', body)) => (body, &b"\n"[..]),
            _ => (buf, &b""[..]),
        };
        if !body.iter().any(|b| b.is_ascii_control() && *b != b'\t') {
            self.0.write_all(buf)?;
            return Ok(buf.len());
        }
        let mut out = Vec::with_capacity(buf.len() + 16);
        for &byte in body {
            match byte {
                b'\t' => out.push(byte),
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                control if control.is_ascii_control() => {
                    out.extend_from_slice(format!("\\x{control:02x}").as_bytes());
                }
                other => out.push(other),
            }
        }
        out.extend_from_slice(end);
        self.0.write_all(&out)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Controller(args) => run_controller(*args).await,
        Command::Run(args) => run_standalone(*args).await,
        Command::Check(args) => check(args).await,
        Command::Route(args) => route(args),
        Command::Crdgen => {
            print!(
                "{}",
                crate::crd::render_yaml().context("rendering the CRDs")?
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Test(args) => test(args).await,
        Command::Deliveries(args) => deliveries(args).await,
        Command::TemplateWorker { memory_limit_mib } => {
            Ok(crate::template::worker_main(memory_limit_mib))
        }
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

/// Binds the receiver's listener.
async fn bind_receiver(
    addr: SocketAddr,
    dispatcher: &Dispatcher,
) -> anyhow::Result<(tokio::net::TcpListener, SocketAddr)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the receiver to {addr}"))?;
    let local = listener
        .local_addr()
        .context("reading the receiver address")?;
    dispatcher.policy().destinations.add_own_listener(local);
    Ok((listener, local))
}

/// Serves the receiver until SIGTERM or Ctrl-C, then cancels `cancel` for everything else.
async fn serve_receiver(
    listener: tokio::net::TcpListener,
    dispatcher: &Dispatcher,
    config: ReceiverConfig,
    cancel: &CancellationToken,
) -> anyhow::Result<()> {
    let stop = cancel.clone();
    let served = receiver::serve(
        listener,
        receiver::router(dispatcher.clone(), config),
        async move {
            shutdown_signal().await;
            tracing::info!("shutting down");
            stop.cancel();
        },
    )
    .await
    .context("serving the receiver");
    cancel.cancel();
    served
}

fn read_token(path: &Option<PathBuf>, what: &str) -> anyhow::Result<Option<Sensitive<String>>> {
    let Some(path) = path else { return Ok(None) };
    let token = std::fs::read_to_string(path)
        .with_context(|| format!("reading the {what} token file {}", path.display()))?;
    let token = token.trim().to_string();
    if token.is_empty() {
        bail!("the {what} token file {} is empty", path.display());
    }
    Ok(Some(Sensitive::new(token)))
}

async fn run_standalone(args: RunArgs) -> anyhow::Result<ExitCode> {
    if args.console.console_listen.is_some() && args.console.console_token_file.is_none() {
        bail!("--console-listen needs --console-token-file in `herald run`");
    }
    let dispatcher = args.core.dispatcher(&args.cluster_namespaces, true).await?;
    let mut loader = Loader::new(&args.config);
    let report = loader
        .reload_if_changed(&dispatcher)
        .with_context(|| format!("reading {}", args.config.display()))?;
    if let Some(report) = &report {
        standalone::log_report(report);
    }
    dispatcher
        .engine()
        .resume()
        .context("resuming pending deliveries")?;
    dispatcher.set_ready(true);

    let config = args.receiver.config()?;
    let (listener, local) = bind_receiver(args.listen, &dispatcher).await?;
    tracing::info!(address = %local, config = %args.config.display(), "herald receiver listening");

    let cancel = CancellationToken::new();
    let admin = args.core.serve_admin(&dispatcher, cancel.clone()).await?;
    let metrics = args
        .receiver
        .serve_metrics(&dispatcher, cancel.clone())
        .await?;
    let console = match read_token(&args.console.console_token_file, "console")? {
        Some(token) if args.console.console_listen.is_some() => {
            let router =
                crate::console::folder_router(args.config.clone(), token, dispatcher.clone());
            args.console
                .serve(&dispatcher, router, cancel.clone())
                .await?
        }
        _ => None,
    };
    let watcher = tokio::spawn(standalone::watch(
        loader,
        dispatcher.clone(),
        args.reload_interval,
        cancel.clone(),
    ));
    serve_receiver(listener, &dispatcher, config, &cancel).await?;
    let _ = watcher.await;
    let _ = admin.await;
    if let Some(console) = console {
        let _ = console.await;
    }
    if let Some(metrics) = metrics {
        let _ = metrics.await;
    }
    dispatcher.engine().shutdown(args.shutdown_timeout).await;
    Ok(ExitCode::SUCCESS)
}

fn load_checked(
    dir: &std::path::Path,
    cluster_namespaces: &[String],
) -> anyhow::Result<(Dispatcher, Manifests)> {
    let manifests = Manifests::load(dir).with_context(|| format!("reading {}", dir.display()))?;
    let dispatcher = Dispatcher::new(cluster_namespaces.iter().cloned(), EngineConfig::default())
        .with_policy(crate::delivery::TargetPolicy::allowing_loopback());
    let mut loader = Loader::new(dir);
    loader
        .reload(&dispatcher)
        .with_context(|| format!("reading {}", dir.display()))?;
    Ok((dispatcher, manifests))
}

/// Renders a webhook's template for a test message, as a delivery would (in a worker, within
/// the template limits): what fails there fails its deliveries too.
async fn trial_render(webhook: &crate::crd::Webhook) -> Option<String> {
    use std::sync::Arc;
    let source = webhook.spec.template.as_deref()?;
    let key = ObjectKey::new(
        webhook.metadata.namespace.clone().unwrap_or_default(),
        webhook.metadata.name.clone().unwrap_or_default(),
    );
    let template = match crate::render::compile_template(source) {
        Ok(template) => Arc::new(template),
        // Reported as the webhook's readiness already.
        Err(_) => return None,
    };
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let alerts = [Arc::new(crate::alert::Alert::test(&key, &now))];
    let content = crate::render::Content {
        webhook: &key,
        kind: webhook.spec.kind,
        test: true,
        alerts: &alerts,
        group_labels: &Arc::default(),
        external_url: &Arc::from(""),
        source: &crate::alert::GroupSource::default(),
    };
    let context = crate::render::template_context(&crate::render::notification(
        content,
        webhook.spec.language,
    ));
    crate::template::render(template, &key.namespace, context)
        .await
        .err()
        .map(|e| format!("{key}: spec.template fails on a test message: {e}"))
}

async fn check(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let (dispatcher, manifests) = load_checked(&args.dir, &args.cluster_namespaces)?;
    template_workers(DEFAULT_TEMPLATE_MEMORY_MIB);
    for webhook in &manifests.webhooks {
        if let Some(warning) = trial_render(webhook).await {
            eprintln!("warning: {warning}");
        }
    }
    let table = dispatcher.table();
    println!(
        "{:<40} {:<7} {:<8} {:<6} CONDITIONS",
        "WEBHOOK", "TYPE", "ENABLED", "READY"
    );
    for key in table.webhook_keys() {
        let Some(input) = table.webhook(&key) else {
            continue;
        };
        let ready = match table.readiness(&key) {
            Some(Ok(())) => "True".to_string(),
            Some(Err(e)) => format!("False ({}: {})", e.reason, e.message),
            None => "Unknown".to_string(),
        };
        let conditions = table.conditions_of(&key).join(",");
        println!(
            "{:<40} {:<7} {:<8} {:<6} {}",
            key.to_string(),
            format!("{:?}", input.spec.kind),
            input.spec.enabled,
            ready,
            if conditions.is_empty() {
                "-"
            } else {
                &conditions
            },
        );
    }
    println!(
        "{} webhooks, {} conditions, {} secrets; cluster namespaces: {}",
        manifests.webhooks.len(),
        manifests.conditions.len(),
        manifests.secrets.len(),
        args.cluster_namespaces.join(",")
    );
    if manifests.errors.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        for error in &manifests.errors {
            eprintln!("error: {error}");
        }
        Ok(ExitCode::FAILURE)
    }
}

fn route(args: RouteArgs) -> anyhow::Result<ExitCode> {
    let (dispatcher, manifests) = load_checked(&args.config, &args.cluster_namespaces)?;
    for error in &manifests.errors {
        eprintln!("warning: {error}");
    }
    let body = std::fs::read(&args.alerts)
        .with_context(|| format!("reading {}", args.alerts.display()))?;
    let mut batch = alert::parse_any(&body, k8s_openapi::jiff::Timestamp::now())
        .with_context(|| format!("parsing {}", args.alerts.display()))?;
    // What the receiver (with default limits) would refuse, alert by alert.
    let refused = batch
        .admit(&alert::PayloadLimits::default(), "")
        .with_context(|| format!("checking {}", args.alerts.display()))?;
    for refusal in &refused {
        println!("refused: {refusal}");
    }
    let table = dispatcher.table();
    for (i, alert) in batch.alerts.iter().enumerate() {
        let labels: Vec<String> = alert
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        println!(
            "alert {} [{}] {{{}}}",
            i + 1,
            alert.status.as_str(),
            labels.join(", ")
        );
        for verdict in table.explain(Subject::alert(alert)) {
            match verdict.outcome {
                Ok(()) => println!("  -> {}", verdict.webhook),
                Err(why) => println!("  x  {}: {why}", verdict.webhook),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn test(args: TestArgs) -> anyhow::Result<ExitCode> {
    let Some(config) = &args.config else {
        return test_in_cluster(&args).await;
    };
    let key = ObjectKey::new(args.namespace.as_str(), args.name.as_str());
    template_workers(DEFAULT_TEMPLATE_MEMORY_MIB);
    let dispatcher = Dispatcher::new([args.namespace.clone()], EngineConfig::default())
        .with_policy(crate::delivery::TargetPolicy::allowing_loopback());
    let mut loader = Loader::new(config);
    let report = loader
        .reload(&dispatcher)
        .with_context(|| format!("reading {}", config.display()))?;
    for error in &report.errors {
        eprintln!("warning: {error}");
    }
    let result = dispatcher.send_test(&key).await;
    dispatcher.engine().shutdown(Duration::from_secs(1)).await;
    let report = result?;
    let status = report
        .http_status
        .map_or_else(|| "-".to_string(), |s| s.to_string());
    println!(
        "webhook {key}: {:?}, HTTP status {status}, latency {} ms{}",
        report.outcome,
        report.latency.as_millis(),
        if report.message.is_empty() || report.outcome == ReportOutcome::Succeeded {
            String::new()
        } else {
            format!(", error: {}", report.message)
        }
    );
    Ok(if report.outcome == ReportOutcome::Succeeded {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// A Kubernetes client from a kubeconfig file, or inferred (in-cluster or `~/.kube/config`).
pub async fn kube_client(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<kube::Client> {
    let config = kube_config(kubeconfig).await?;
    kube::Client::try_from(config).context("building the Kubernetes client")
}

/// Kubernetes client settings from a kubeconfig file, or inferred.
pub async fn kube_config(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<kube::Config> {
    Ok(match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("loading kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("finding Kubernetes credentials (in-cluster or ~/.kube/config)")?,
    })
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| format!("herald-{}", std::process::id()))
}

async fn run_controller(args: ControllerArgs) -> anyhow::Result<ExitCode> {
    let kube_config = kube_config(args.kubeconfig.as_deref()).await?;
    let client =
        kube::Client::try_from(kube_config.clone()).context("building the Kubernetes client")?;
    let cluster_namespaces = if args.cluster_namespaces.is_empty() {
        vec![args.namespace.clone()]
    } else {
        args.cluster_namespaces.clone()
    };
    let dispatcher = args.core.dispatcher(&cluster_namespaces, false).await?;
    let identity = args.identity.clone().unwrap_or_else(hostname);
    let cancel = CancellationToken::new();
    let admin = args.core.serve_admin(&dispatcher, cancel.clone()).await?;
    let metrics = args
        .receiver
        .serve_metrics(&dispatcher, cancel.clone())
        .await?;
    if args.console.console_token_file.is_some() {
        tracing::warn!(
            "--console-token-file is for `herald run`; in a cluster users sign in with their own token"
        );
    }
    let console = args
        .console
        .serve(
            &dispatcher,
            crate::console::cluster_router(kube_config, dispatcher.clone()),
            cancel.clone(),
        )
        .await?;
    // Leadership: true while this replica leads (always, without an election).
    let (leader, leading) = tokio::sync::watch::channel(!args.leader_election);
    let bookmark = crate::controller::leader::EventsBookmark::default();
    let election = args.leader_election.then(|| {
        let config = crate::controller::leader::LeaseConfig {
            namespace: args.namespace.clone(),
            name: args.lease_name.clone(),
            identity: identity.clone(),
            duration: Duration::from_secs(15),
            retry_period: Duration::from_secs(2),
        };
        tokio::spawn(crate::controller::leader::run(
            client.clone(),
            config,
            leader,
            bookmark.clone(),
            cancel.clone(),
        ))
    });
    let controller = tokio::spawn(crate::controller::run(
        client,
        dispatcher.clone(),
        crate::controller::ControllerSettings {
            watch_namespaces: args.watch_namespaces.clone(),
            identity: identity.clone(),
            status_interval: args.status_interval,
            watch_events: args.events,
        },
        leading,
        bookmark,
        cancel.clone(),
    ));

    let (listener, local) = bind_receiver(args.listen, &dispatcher).await?;
    tracing::info!(address = %local, identity = %identity, cluster_namespaces = ?cluster_namespaces, "herald controller starting");
    serve_receiver(listener, &dispatcher, args.receiver.config()?, &cancel).await?;
    let _ = controller.await;
    let _ = admin.await;
    if let Some(console) = console {
        let _ = console.await;
    }
    if let Some(metrics) = metrics {
        let _ = metrics.await;
    }
    if let Some(election) = election {
        let _ = election.await;
    }
    dispatcher.engine().shutdown(args.shutdown_timeout).await;
    Ok(ExitCode::SUCCESS)
}

async fn test_in_cluster(args: &TestArgs) -> anyhow::Result<ExitCode> {
    use kube::api::{Api, Patch, PatchParams};

    let client = kube_client(args.kubeconfig.as_deref()).await?;
    let api: Api<crate::crd::Webhook> = Api::namespaced(client, &args.namespace);
    let token = uuid::Uuid::now_v7().to_string();
    let patch =
        serde_json::json!({"metadata": {"annotations": {crate::crd::TEST_ANNOTATION: token}}});
    api.patch(&args.name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .with_context(|| format!("annotating webhook {}/{}", args.namespace, args.name))?;
    let deadline = tokio::time::Instant::now() + args.timeout;
    loop {
        let webhook = api
            .get(&args.name)
            .await
            .with_context(|| format!("reading webhook {}/{}", args.namespace, args.name))?;
        if let Some(result) = webhook
            .status
            .and_then(|s| s.last_test)
            .filter(|t| t.token == token)
        {
            let status = result
                .http_status
                .map_or_else(|| "-".to_string(), |s| s.to_string());
            println!(
                "webhook {}/{}: {:?}, HTTP status {status}, {}",
                args.namespace, args.name, result.outcome, result.message
            );
            return Ok(
                if result.outcome == crate::crd::DeliveryOutcome::Succeeded {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                },
            );
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "no test result within {:?}: is `herald controller` running and watching namespace {}?",
                args.timeout,
                args.namespace
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// One call to Herald's admin API: the status and the JSON answer (`null` when there is none).
async fn admin_call(
    client: &crate::delivery::client::HttpClient,
    token: Option<&Sensitive<String>>,
    method: http::Method,
    url: &str,
) -> anyhow::Result<(http::StatusCode, serde_json::Value)> {
    use http_body_util::BodyExt as _;
    let mut request = http::Request::new(crate::delivery::client::RequestBody::default());
    *request.method_mut() = method;
    if let Some(token) = token {
        let mut value = http::HeaderValue::try_from(format!("Bearer {}", token.expose()))
            .context("the admin token holds characters not allowed in a header")?;
        value.set_sensitive(true);
        request
            .headers_mut()
            .insert(http::header::AUTHORIZATION, value);
    }
    *request.uri_mut() = url
        .parse()
        .with_context(|| format!("{url} is not a valid URL"))?;
    let response = tokio::time::timeout(Duration::from_secs(30), client.send(request))
        .await
        .context("no answer within 30s")?
        .map_err(|e| anyhow::anyhow!(crate::delivery::client::describe_error(&e)))?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .context("reading the answer")?
        .to_bytes();
    let json = serde_json::from_slice(&body).unwrap_or_default();
    Ok((status, json))
}

async fn deliveries(args: DeliveriesArgs) -> anyhow::Result<ExitCode> {
    let client = crate::delivery::client::HttpClient::new(&Default::default())?;
    let token = read_token(&args.token_file, "admin")?;
    let base = args.server.trim_end_matches('/');
    let contacting = || format!("contacting Herald's admin listener at {base}");
    if let Some(DeliveriesAction::Replay { id }) = &args.action {
        let (status, body) = admin_call(
            &client,
            token.as_ref(),
            http::Method::POST,
            &format!("{base}/api/v1/deliveries/{id}/replay"),
        )
        .await
        .with_context(contacting)?;
        if status.is_success() {
            println!("replaying {id}");
            return Ok(ExitCode::SUCCESS);
        }
        bail!(
            "replay refused ({status}): {}",
            body["error"].as_str().unwrap_or("")
        );
    }
    let mut query = url::form_urlencoded::Serializer::new(String::new());
    query.append_pair("limit", &args.limit.to_string());
    if let Some(webhook) = &args.webhook {
        query.append_pair("webhook", webhook);
    }
    if args.failed {
        query.append_pair("outcome", "Failed");
    } else if let Some(outcome) = &args.outcome {
        query.append_pair("outcome", outcome);
    }
    let (status, body) = admin_call(
        &client,
        token.as_ref(),
        http::Method::GET,
        &format!("{base}/api/v1/deliveries?{}", query.finish()),
    )
    .await
    .with_context(contacting)?;
    if !status.is_success() {
        bail!(
            "listing refused ({status}): {}",
            body["error"].as_str().unwrap_or("")
        );
    }
    let records: Vec<crate::store::DeliveryRecord> =
        serde_json::from_value(body["deliveries"].clone()).context("decoding delivery records")?;
    println!(
        "{:<36} {:<28} {:<27} {:<9} {:>6} {:>8} {:>6} {:>9}  ERROR",
        "ID", "WEBHOOK", "TIME", "OUTCOME", "STATUS", "ATTEMPTS", "ALERTS", "LATENCY"
    );
    for r in records {
        println!(
            "{:<36} {:<28} {:<27} {:<9} {:>6} {:>8} {:>6} {:>7}ms  {}",
            r.id.to_string(),
            r.webhook.to_string(),
            r.time.to_string(),
            format!("{:?}", r.outcome),
            r.http_status
                .map_or_else(|| "-".to_string(), |s| s.to_string()),
            r.attempts,
            r.alerts,
            r.latency_ms,
            r.error
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    #[test]
    fn log_lines_cannot_carry_control_characters() {
        use std::io::Write as _;
        let mut writer = super::EscapingWriter(Vec::new());
        writer
            .write_all(b"error: HTTP 500: ok\r\nINFO forged\x1b[2J\n")
            .expect("write");
        assert_eq!(
            String::from_utf8(writer.0).expect("utf8"),
            "error: HTTP 500: ok\\r\\nINFO forged\\x1b[2J\n"
        );
    }
}
