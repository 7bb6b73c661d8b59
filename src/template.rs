//! Custom body templates in a box: a template written by a tenant runs with a step budget
//! (MiniJinja's fuel), a bound on what it may write, and a wall-clock deadline, off the async
//! runtime, at most one per namespace and a few overall. One tenant's heavy template then
//! costs only that tenant's deliveries: they fail with a reason, and everything else keeps
//! running.
//!
//! The `herald` binary renders in worker processes (`herald template-worker`) with a memory
//! limit: a template that builds a huge string ends its worker, not Herald, and one past its
//! deadline is killed. Used as a library without [`use_workers`], templates render on tokio's
//! blocking threads (same fuel, output and deadline bounds, no memory bound).

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Bounds on one render of a custom template.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TemplateLimits {
    /// Steps (MiniJinja instructions) one render may take.
    pub fuel: u64,
    /// Bytes one render may write.
    pub max_output: usize,
    /// Wall-clock time one render may take, waiting for a thread included.
    pub deadline: Duration,
    /// Largest template source accepted, in bytes.
    pub max_source: usize,
}

impl Default for TemplateLimits {
    fn default() -> Self {
        TemplateLimits {
            fuel: 1_000_000,
            max_output: 1024 * 1024,
            deadline: Duration::from_secs(2),
            max_source: 64 * 1024,
        }
    }
}

/// Why a custom template produced no body.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// The source is larger than allowed.
    #[error("the template is {size} bytes; at most {max} are allowed")]
    TooLong {
        /// Its size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The source does not compile.
    #[error("{0}")]
    Syntax(String),
    /// Rendering took more steps than allowed.
    #[error("the template used more than its {0} steps and was stopped")]
    OutOfFuel(u64),
    /// Rendering wrote more than allowed.
    #[error("the template's output exceeds {0} bytes and was stopped")]
    TooLarge(usize),
    /// Rendering did not finish in time.
    #[error("the template did not finish within {0:?} and was stopped")]
    Deadline(Duration),
    /// The worker rendering it ran out of memory (or otherwise died).
    #[error(
        "the template's renderer exceeded its memory limit of {0} MiB (or crashed) and was stopped"
    )]
    Memory(u64),
    /// Rendering failed (an undefined value, a wrong type, ...).
    #[error("{0}")]
    Failed(String),
    /// The rendering thread stopped without an answer.
    #[error("the template renderer stopped: {0}")]
    Stopped(String),
}

/// A checked template and the limits it runs under. Checking parses it only: compiling folds
/// constant expressions (`"x" * 100000000 ~ ...`), which can take any amount of memory, so a
/// template is compiled where it renders (a worker process, see [`use_workers`]).
#[derive(Debug)]
pub struct SandboxedTemplate {
    limits: TemplateLimits,
    source: String,
    /// Compiled on first render on this side, when templates render in-process.
    compiled: std::sync::OnceLock<Result<minijinja::Environment<'static>, String>>,
}

/// The name the template is kept under in its environment.
const NAME: &str = "body";

impl SandboxedTemplate {
    /// Checks a template's size and syntax (errors name the line), without compiling it.
    pub fn compile(source: &str, limits: TemplateLimits) -> Result<Self, TemplateError> {
        if source.len() > limits.max_source {
            return Err(TemplateError::TooLong {
                size: source.len(),
                max: limits.max_source,
            });
        }
        minijinja::machinery::parse(
            source,
            NAME,
            Default::default(),
            minijinja::machinery::WhitespaceConfig::default(),
        )
        .map_err(|e| TemplateError::Syntax(e.to_string()))?;
        Ok(SandboxedTemplate {
            limits,
            source: source.to_string(),
            compiled: std::sync::OnceLock::new(),
        })
    }

    /// The limits this template runs under.
    pub fn limits(&self) -> TemplateLimits {
        self.limits
    }

    fn environment(&self) -> Result<&minijinja::Environment<'static>, TemplateError> {
        self.compiled
            .get_or_init(|| {
                let mut env = minijinja::Environment::new();
                env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
                env.set_fuel(Some(self.limits.fuel));
                env.add_template_owned(NAME, self.source.clone())
                    .map_err(|e| e.to_string())?;
                Ok(env)
            })
            .as_ref()
            .map_err(|e| TemplateError::Syntax(e.clone()))
    }

    /// Compiles (once) and renders on the calling thread, within the step and output bounds
    /// (not the deadline or a memory bound: see [`render`] for those).
    pub fn render_here(&self, context: &minijinja::Value) -> Result<Vec<u8>, TemplateError> {
        let template = self
            .environment()?
            .get_template(NAME)
            .map_err(|e| TemplateError::Failed(e.to_string()))?;
        let mut out = BoundedWriter {
            bytes: Vec::new(),
            max: self.limits.max_output,
            overflowed: false,
        };
        match template.render_captured_to(context, &mut out) {
            Ok(_) => Ok(out.bytes),
            Err(_) if out.overflowed => Err(TemplateError::TooLarge(self.limits.max_output)),
            Err(e) if e.kind() == minijinja::ErrorKind::OutOfFuel => {
                Err(TemplateError::OutOfFuel(self.limits.fuel))
            }
            Err(e) => Err(TemplateError::Failed(e.to_string())),
        }
    }
}

/// A writer that refuses to grow past `max` bytes.
struct BoundedWriter {
    bytes: Vec<u8>,
    max: usize,
    overflowed: bool,
}

impl io::Write for BoundedWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.bytes.len() + buf.len() > self.max {
            self.overflowed = true;
            return Err(io::Error::other("output limit reached"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Renders at once, across all tenants (worker processes, or threads in-process): with the
/// per-namespace bound, two tenants render side by side, and with the default memory limit
/// the workers take at most 128 MiB.
const POOL_SIZE: usize = 2;

/// The render pool: a bound on renders in flight overall, and one per namespace, so that one
/// tenant's templates hold at most one thread.
struct Pool {
    overall: Arc<Semaphore>,
    per_namespace: Mutex<HashMap<String, Arc<Semaphore>>>,
}

static POOL: LazyLock<Pool> = LazyLock::new(|| Pool {
    overall: Arc::new(Semaphore::new(POOL_SIZE)),
    per_namespace: Mutex::new(HashMap::new()),
});

impl Pool {
    fn namespace(&self, namespace: &str) -> Arc<Semaphore> {
        let mut map = self.per_namespace.lock().unwrap_or_else(|e| e.into_inner());
        // Forget namespaces nobody renders in right now (a semaphore with its one permit free
        // and no other holder).
        if map.len() > 1024 {
            map.retain(|_, s| Arc::strong_count(s) > 1 || s.available_permits() == 0);
        }
        map.entry(namespace.to_string())
            .or_insert_with(|| Arc::new(Semaphore::new(1)))
            .clone()
    }

    async fn permits(
        &self,
        namespace: &str,
    ) -> Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)> {
        let own = self.namespace(namespace).acquire_owned().await.ok()?;
        let overall = self.overall.clone().acquire_owned().await.ok()?;
        Some((own, overall))
    }
}

/// Renders a tenant's template off the async runtime, within its limits: the wait for a
/// turn and the render together take at most the deadline.
pub async fn render(
    template: Arc<SandboxedTemplate>,
    namespace: &str,
    context: minijinja::Value,
) -> Result<Vec<u8>, TemplateError> {
    let deadline = template.limits.deadline;
    let work = async move {
        let permits = POOL
            .permits(namespace)
            .await
            .ok_or_else(|| TemplateError::Stopped("the render pool is closed".into()))?;
        if let Some(workers) = WORKERS.get() {
            let result = workers.render(&template, &context).await;
            drop(permits);
            return result;
        }
        // A render that misses its deadline keeps its thread until its fuel runs out, so the
        // threads in use stay bounded.
        let task = tokio::task::spawn_blocking(move || {
            let result = template.render_here(&context);
            drop(permits);
            result
        });
        task.await
            .map_err(|e| TemplateError::Stopped(e.to_string()))?
    };
    tokio::time::timeout(deadline, work)
        .await
        .unwrap_or(Err(TemplateError::Deadline(deadline)))
}

/// The worker processes, once [`use_workers`] was called.
static WORKERS: std::sync::OnceLock<Workers> = std::sync::OnceLock::new();

/// Renders every template from now on in worker processes: `program` run with the argument
/// `template-worker` and `--memory-limit-mib` (the `herald` binary itself).
pub fn use_workers(program: std::path::PathBuf, memory_limit_mib: u64) {
    let _ = WORKERS.set(Workers {
        program,
        memory_limit_mib,
        idle: Mutex::new(Vec::new()),
    });
}

/// Idle worker processes, started on demand; a worker that fails or misses a deadline is
/// killed rather than reused.
struct Workers {
    program: std::path::PathBuf,
    memory_limit_mib: u64,
    idle: Mutex<Vec<Worker>>,
}

struct Worker {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    stdout: tokio::io::BufReader<tokio::process::ChildStdout>,
}

/// One render asked of a worker (one JSON line).
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct WorkerRequest {
    source: String,
    context: serde_json::Value,
    fuel: u64,
    max_output: usize,
}

/// A worker's answer (one JSON line).
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
enum WorkerAnswer {
    Body(String),
    OutOfFuel,
    TooLarge,
    Failed(String),
}

impl Workers {
    fn spawn(&self) -> Result<Worker, TemplateError> {
        let mut child = tokio::process::Command::new(&self.program)
            .args([
                "template-worker",
                "--memory-limit-mib",
                &self.memory_limit_mib.to_string(),
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| TemplateError::Stopped(format!("cannot start a template worker: {e}")))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(TemplateError::Stopped(
                "the template worker has no pipes".into(),
            ));
        };
        Ok(Worker {
            child,
            stdin,
            stdout: tokio::io::BufReader::new(stdout),
        })
    }

    async fn render(
        &self,
        template: &SandboxedTemplate,
        context: &minijinja::Value,
    ) -> Result<Vec<u8>, TemplateError> {
        use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut worker = match idle {
            Some(worker) => worker,
            None => self.spawn()?,
        };
        let request = WorkerRequest {
            source: template.source.clone(),
            context: serde_json::to_value(context)
                .map_err(|e| TemplateError::Failed(e.to_string()))?,
            fuel: template.limits.fuel,
            max_output: template.limits.max_output,
        };
        let mut line =
            serde_json::to_vec(&request).map_err(|e| TemplateError::Failed(e.to_string()))?;
        line.push(b'\n');
        let mut answer = String::new();
        let exchanged = async {
            worker.stdin.write_all(&line).await?;
            worker.stdin.flush().await?;
            worker.stdout.read_line(&mut answer).await
        }
        .await;
        match exchanged {
            Ok(n) if n > 0 => {}
            // The worker is gone: out of memory (its allocator failed under the limit), or
            // killed. Dropping it reaps it.
            _ => {
                let _ = worker.child.start_kill();
                return Err(TemplateError::Memory(self.memory_limit_mib));
            }
        }
        let answer: WorkerAnswer = serde_json::from_str(&answer)
            .map_err(|e| TemplateError::Stopped(format!("unreadable worker answer: {e}")))?;
        self.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(worker);
        match answer {
            WorkerAnswer::Body(body) => Ok(body.into_bytes()),
            WorkerAnswer::OutOfFuel => Err(TemplateError::OutOfFuel(template.limits.fuel)),
            WorkerAnswer::TooLarge => Err(TemplateError::TooLarge(template.limits.max_output)),
            WorkerAnswer::Failed(message) => Err(TemplateError::Failed(message)),
        }
    }
}

/// `herald template-worker`: renders requests from standard input, one JSON line each, with
/// the process's data size limited to `memory_limit_mib`; answers on standard output. Ends at
/// the end of its input (or when its allocator fails under the limit).
pub fn worker_main(memory_limit_mib: u64) -> std::process::ExitCode {
    use std::io::{BufRead as _, Write as _};
    let bytes = memory_limit_mib.saturating_mul(1024 * 1024);
    let limit = libc::rlimit {
        rlim_cur: bytes as libc::rlim_t,
        rlim_max: bytes as libc::rlim_t,
    };
    // SAFETY: setrlimit reads the struct it is given; RLIMIT_DATA bounds this process alone.
    if unsafe { libc::setrlimit(libc::RLIMIT_DATA, &limit) } != 0 {
        eprintln!(
            "template-worker: cannot limit memory: {}",
            std::io::Error::last_os_error()
        );
        return std::process::ExitCode::FAILURE;
    }
    let mut compiled: HashMap<String, SandboxedTemplate> = HashMap::new();
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout().lock();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        let answer = match serde_json::from_str::<WorkerRequest>(&line) {
            Err(e) => WorkerAnswer::Failed(format!("unreadable request: {e}")),
            Ok(request) => {
                let limits = TemplateLimits {
                    fuel: request.fuel,
                    max_output: request.max_output,
                    max_source: usize::MAX,
                    ..TemplateLimits::default()
                };
                if compiled.len() > 256 {
                    compiled.clear();
                }
                let template = match compiled.entry(request.source) {
                    std::collections::hash_map::Entry::Occupied(entry) => Ok(entry.into_mut()),
                    std::collections::hash_map::Entry::Vacant(entry) => {
                        SandboxedTemplate::compile(entry.key(), limits).map(|t| entry.insert(t))
                    }
                };
                let context = minijinja::Value::from_serialize(&request.context);
                match template.and_then(|t| t.render_here(&context)) {
                    Ok(body) => WorkerAnswer::Body(String::from_utf8_lossy(&body).into_owned()),
                    Err(TemplateError::OutOfFuel(_)) => WorkerAnswer::OutOfFuel,
                    Err(TemplateError::TooLarge(_)) => WorkerAnswer::TooLarge,
                    Err(e) => WorkerAnswer::Failed(e.to_string()),
                }
            }
        };
        let Ok(mut out) = serde_json::to_vec(&answer) else {
            break;
        };
        out.push(b'\n');
        if stdout
            .write_all(&out)
            .and_then(|()| stdout.flush())
            .is_err()
        {
            break;
        }
    }
    std::process::ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compile(source: &str) -> SandboxedTemplate {
        SandboxedTemplate::compile(source, TemplateLimits::default()).expect("compiles")
    }

    #[test]
    fn endless_loops_run_out_of_fuel() {
        let t = compile(
            "{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}",
        );
        assert!(matches!(
            t.render_here(&minijinja::Value::UNDEFINED),
            Err(TemplateError::OutOfFuel(_))
        ));
    }

    #[test]
    fn large_output_is_cut_off() {
        let t = compile("{{ 'x' * 2000000 }}");
        assert!(matches!(
            t.render_here(&minijinja::Value::UNDEFINED),
            Err(TemplateError::TooLarge(_))
        ));
        let t = compile("{% for i in range(3000) %}{{ 'y' * 1000 }}{% endfor %}");
        assert!(matches!(
            t.render_here(&minijinja::Value::UNDEFINED),
            Err(TemplateError::TooLarge(_))
        ));
    }

    #[test]
    fn checking_does_not_fold_constants() {
        // Compiling this would build a 400 MB string; checking it only parses.
        let bomb =
            "{{ ('x' * 100000000 ~ 'x' * 100000000) ~ ('x' * 100000000 ~ 'x' * 100000000) }}";
        assert!(SandboxedTemplate::compile(bomb, TemplateLimits::default()).is_ok());
        assert!(matches!(
            SandboxedTemplate::compile("{% for %}", TemplateLimits::default()),
            Err(TemplateError::Syntax(_))
        ));
    }

    #[test]
    fn long_sources_are_refused() {
        let source = "x".repeat(TemplateLimits::default().max_source + 1);
        assert!(matches!(
            SandboxedTemplate::compile(&source, TemplateLimits::default()),
            Err(TemplateError::TooLong { .. })
        ));
    }

    #[tokio::test]
    async fn a_slow_render_misses_its_deadline_without_blocking_the_runtime() {
        // Enough fuel for far longer than the deadline (a render keeps its thread until its
        // fuel runs out, which this test's runtime then waits for).
        let limits = TemplateLimits {
            fuel: 20_000_000,
            deadline: Duration::from_millis(1),
            ..TemplateLimits::default()
        };
        let t = Arc::new(
            SandboxedTemplate::compile(
                "{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}",
                limits,
            )
            .expect("compiles"),
        );
        let result = render(t, "team-a", minijinja::Value::UNDEFINED).await;
        assert!(
            matches!(result, Err(TemplateError::Deadline(_))),
            "{result:?}"
        );
        // Another namespace still renders.
        let quick = Arc::new(compile("ok"));
        let out = render(quick, "team-b", minijinja::Value::UNDEFINED)
            .await
            .expect("renders");
        assert_eq!(out, b"ok");
    }
}
