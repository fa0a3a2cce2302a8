//! Running a sweep's runs on a Slurm cluster (`--backend slurm`): the unfinished runs go to one job
//! array (`sbatch --array=0-N%M`), one array task per run, through a job script written into the
//! sweep's folder that maps the task index to the run's trainer command ([`Launch::args`], as the
//! local backend runs it). `--wait` follows the array with progress lines read from the runs'
//! folders, `--status` shows each run's state, `--cancel` scancels the array (each running run
//! stops after its step with a checkpoint, as on Ctrl-C).
//!
//! The sweep's folder must be one the compute nodes share with the submitting machine: each
//! submission writes a marker with a random token there, and each task checks it before it runs,
//! so that a folder the nodes do not see (or see as another, node-local one) is reported rather
//! than trained into where nobody reads it.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use super::experiment::PlannedRun;
use super::report::{Finished, finished};
use super::{Launch, fmt_secs, last_lines, write_atomic};

/// The job script, in the sweep's folder.
const SCRIPT: &str = "slurm-job.sh";
/// The record of the last submission ([`Record`]), in the sweep's folder.
const RECORD: &str = "slurm-job.json";
/// The marker holding the last submission's token, in the sweep's folder.
const TOKEN: &str = ".slurm-token";
/// The folder of Slurm's own output of each task (the script's messages; the trainer writes to
/// its run's folder).
const LOGS: &str = "slurm";
/// A run's JSON progress lines (the trainer's stdout), in its folder.
const PROGRESS: &str = "progress.jsonl";
/// What a task writes in its run's folder once it has found the marker: `JOB TASK HOST`.
const STARTED: &str = "slurm-task";
/// The exit code of a task that did not find the marker (EX_CONFIG of sysexits.h).
const NOT_VISIBLE_EXIT: u8 = 78;
/// Seconds before the time limit at which Slurm sends SIGTERM, for the run to stop after its step
/// with a checkpoint (a step of the largest recipes takes seconds; the checkpoint is written
/// at once).
const SIGTERM_LEAD_S: u32 = 120;
/// The part of the trainer's message when it stopped on a signal with a checkpoint.
const STOPPED: &str = "stopped by the user at step";
/// What to do when the output folder is not visible to the nodes.
const NOT_VISIBLE: &str = "the output folder is not visible to the compute nodes: put it on a shared filesystem";

/// Options of `--backend slurm`.
#[derive(Debug, Clone, Default)]
pub struct SlurmOptions {
    /// `--partition`.
    pub partition: Option<String>,
    /// `--cpus-per-task`: also each run's threads.
    pub cpus_per_task: Option<usize>,
    /// `--gpus-per-task`.
    pub gpus_per_task: Option<usize>,
    /// Array tasks at once (`%M` of `--array`).
    pub max_parallel: Option<usize>,
    /// `--time`, each run's time limit.
    pub time: Option<String>,
    /// More `sbatch` arguments, passed as they are, after ours.
    pub sbatch_args: Vec<String>,
    /// Follow the array until it ends, then write the tables.
    pub wait: bool,
}

/// The last submission of a sweep (`slurm-job.json`): its job id, token and runs by task index.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    /// The array's job id.
    pub job: String,
    /// The token each task checks the sweep folder's marker against.
    pub token: String,
    /// Run names; array task `i` runs `runs[i]`.
    pub runs: Vec<String>,
    /// When it was submitted (seconds since the Unix epoch).
    pub submitted: u64,
    /// Whether `--cancel` cancelled it (so that tasks that never started are not taken for tasks
    /// that could not see the folder).
    #[serde(default)]
    pub cancelled: bool,
}

impl Record {
    /// The sweep's record, if it has one.
    pub fn load(out: &Path) -> Result<Option<Self>> {
        let path = out.join(RECORD);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let r = serde_json::from_str(&text).with_context(|| {
            format!("{}: not a Slurm job record; delete it if no job of this sweep runs", path.display())
        })?;
        Ok(Some(r))
    }

    fn save(&self, out: &Path) -> Result<()> {
        write_atomic(&out.join(RECORD), serde_json::to_string_pretty(self)?.as_bytes())
    }
}

/// Checks that Slurm's client commands are here, before anything is built or written.
pub fn check_client() -> Result<()> {
    run_slurm("sbatch", ["--version"]).map(|_| ())
}

/// One array task as `squeue` shows it.
#[derive(Debug, Clone)]
struct Task {
    /// `PENDING`, `RUNNING`, `COMPLETED`, ...
    state: String,
    /// Why it waits (or `None`).
    reason: String,
    /// Where it runs.
    node: String,
}

/// Whether a job state is one a task leaves (a task in any other is queued, running or ending).
fn ended(state: &str) -> bool {
    matches!(
        state,
        "COMPLETED"
            | "FAILED"
            | "CANCELLED"
            | "TIMEOUT"
            | "OUT_OF_MEMORY"
            | "NODE_FAIL"
            | "BOOT_FAIL"
            | "DEADLINE"
            | "PREEMPTED"
            | "REVOKED"
    )
}

/// Runs a Slurm client command and returns its stdout; its absence and its refusals are errors
/// that show Slurm's own message.
fn run_slurm<I, S>(cmd: &str, args: I) -> Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let out = match Command::new(cmd).args(args).stdin(Stdio::null()).output() {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("`{cmd}` is not installed here: install slurm-client, or run on a login node of the cluster")
        }
        Err(e) => return Err(e).with_context(|| format!("cannot run {cmd}")),
    };
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let msg = if stderr.trim().is_empty() { String::from_utf8_lossy(&out.stdout) } else { stderr };
        let msg = msg.trim().lines().collect::<Vec<_>>().join(" | ");
        let hint = if msg.contains("contact slurm controller") || msg.contains("configuration source") {
            "; is this a login node of the cluster, and is its controller up (`scontrol ping`; SLURM_CONF \
             names another configuration)?"
        } else {
            ""
        };
        bail!("{cmd} failed ({}): {msg}{hint}", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The job's array tasks by index, as `squeue` shows them (ended ones too, while the controller
/// remembers them); empty once it has forgotten the job.
fn squeue(job: &str) -> Result<HashMap<usize, Task>> {
    let text = match run_slurm("squeue", ["-h", "-r", "-t", "all", "-j", job, "-o", "%K|%T|%r|%N"]) {
        Ok(t) => t,
        Err(e) if format!("{e:#}").contains("Invalid job id") => return Ok(HashMap::new()),
        Err(e) => return Err(e),
    };
    let mut tasks = HashMap::new();
    for line in text.lines() {
        let mut cells = line.split('|');
        let (Some(i), Some(state), Some(reason), Some(node)) = (cells.next(), cells.next(), cells.next(), cells.next())
        else {
            continue;
        };
        if let Ok(i) = i.trim().parse() {
            tasks.insert(i, Task { state: state.into(), reason: reason.into(), node: node.into() });
        }
    }
    Ok(tasks)
}

/// The job's ended array tasks by index from accounting (`sacct`): state and exit code. Best
/// effort: many clusters (and the tests' one) keep no accounting, and then this is empty.
fn sacct(job: &str) -> HashMap<usize, String> {
    let Ok(text) = run_slurm("sacct", ["-n", "-P", "-X", "-j", job, "-o", "JobID,State,ExitCode"]) else {
        return HashMap::new();
    };
    let mut tasks = HashMap::new();
    for line in text.lines() {
        let cells: Vec<&str> = line.split('|').collect();
        let [id, state, code] = cells[..] else { continue };
        let Some(i) = id.split_once('_').and_then(|(_, i)| i.parse().ok()) else { continue };
        let state = state.split_whitespace().next().unwrap_or(state);
        tasks.insert(i, format!("{state}, exit code {code}"));
    }
    tasks
}

/// The sweep's recorded job if any of its tasks is still queued, running or ending.
pub fn active_job(out: &Path) -> Result<Option<Record>> {
    let Some(record) = Record::load(out)? else { return Ok(None) };
    let tasks = squeue(&record.job)?;
    Ok(tasks.values().any(|t| !ended(&t.state)).then_some(record))
}

/// Submits `runs[i]` for each `i` of `todo` as one job array, in that order, and records it.
pub fn submit(launch: &Launch<'_>, runs: &[PlannedRun], todo: &[usize], opts: &SlurmOptions) -> Result<Record> {
    let out = launch.out;
    let Some(last) = todo.len().checked_sub(1) else { bail!("no run to submit") };
    let logs = out.join(LOGS);
    std::fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;
    let token = random_token();
    let todo_runs: Vec<&PlannedRun> = todo.iter().map(|&i| &runs[i]).collect();
    write_atomic(&out.join(SCRIPT), &job_script(launch, &todo_runs, &token))?;
    // The marker goes in before the array can start: a task that finds another token reads an
    // older submission's marker, or a node-local folder of the same name.
    write_atomic(&out.join(TOKEN), token.as_bytes())?;

    let name = out.file_name().map_or_else(|| "sweep".into(), |n| n.to_string_lossy().into_owned());
    let mut args: Vec<OsString> = vec!["--parsable".into(), format!("--job-name=int8-{name}").into()];
    args.push(
        match opts.max_parallel {
            Some(m) => format!("--array=0-{last}%{m}"),
            None => format!("--array=0-{last}"),
        }
        .into(),
    );
    // One task per run: a run is one process (its threads share the task's CPUs).
    args.push("--ntasks=1".into());
    if let Some(c) = opts.cpus_per_task {
        args.push(format!("--cpus-per-task={c}").into());
    }
    if let Some(g) = opts.gpus_per_task {
        args.push(format!("--gpus-per-task={g}").into());
    }
    if let Some(p) = &opts.partition {
        args.push(format!("--partition={p}").into());
    }
    if let Some(t) = &opts.time {
        args.push(format!("--time={t}").into());
    }
    // `B:` signals the batch step's own process, which is the trainer (the script execs it):
    // the time limit then stops a run after its step with a checkpoint, as `scancel` does.
    args.push(format!("--signal=B:TERM@{SIGTERM_LEAD_S}").into());
    args.push(join_os("--chdir=", out));
    args.push(join_os("--output=", &logs.join("%A_%a.out")));
    args.extend(opts.sbatch_args.iter().map(OsString::from));
    args.push(out.join(SCRIPT).into());
    let stdout = run_slurm("sbatch", &args).context("sbatch refused the sweep's job array")?;
    // `--parsable` prints `JOBID` or `JOBID;CLUSTER`.
    let job = stdout.trim().split(';').next().unwrap_or("").to_string();
    if job.is_empty() || !job.chars().all(|c| c.is_ascii_digit()) {
        bail!("sbatch answered `{}`, not a job id; check the --sbatch-arg values", stdout.trim());
    }
    let record = Record {
        job,
        token,
        runs: todo_runs.iter().map(|r| r.name.clone()).collect(),
        submitted: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        cancelled: false,
    };
    record.save(out)?;
    let at_once = opts.max_parallel.map_or_else(String::new, |m| format!(", {m} at a time"));
    println!(
        "submitted job {}: {} runs as array tasks 0-{last}{at_once} (job script {}, Slurm's output in {})",
        record.job,
        todo.len(),
        out.join(SCRIPT).display(),
        logs.display()
    );
    Ok(record)
}

/// `--option=path` as one argument, whatever bytes the path holds.
fn join_os(option: &str, path: &Path) -> OsString {
    let mut s = OsString::from(option);
    s.push(path);
    s
}

/// A token no earlier submission has: 128 bits from the standard library's randomly keyed
/// hasher (xtask takes no random-number crate for this one use), mixed with the time and the
/// process id.
fn random_token() -> String {
    use std::hash::{BuildHasher, Hasher};
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    (0..2u8)
        .map(|i| {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u128(nanos);
            h.write_u32(std::process::id());
            h.write_u8(i);
            format!("{:016x}", h.finish())
        })
        .collect()
}

/// `s` single-quoted for bash, whatever bytes it holds.
fn quote(s: &OsStr) -> Vec<u8> {
    let mut q = vec![b'\''];
    for &b in s.as_encoded_bytes() {
        if b == b'\'' {
            q.extend_from_slice(b"'\\''");
        } else {
            q.push(b);
        }
    }
    q.push(b'\'');
    q
}

/// The job script: array task `i` runs `runs[i]` with the trainer command of [`Launch::args`].
fn job_script(launch: &Launch<'_>, runs: &[&PlannedRun], token: &str) -> Vec<u8> {
    let mut s: Vec<u8> = Vec::new();
    let mut line = |parts: &[&[u8]]| {
        for p in parts {
            s.extend_from_slice(p);
        }
        s.push(b'\n');
    };
    line(&[b"#!/bin/bash"]);
    line(&[b"# A sweep's job array, written by `cargo xtask sweep --backend slurm`: array task i runs"]);
    line(&[b"# the i-th run below with the trainer command the local backend runs."]);
    line(&[b"set -u"]);
    line(&[b"out=", &quote(launch.out.as_os_str())]);
    line(&[b"root=", &quote(launch.root.as_os_str())]);
    line(&[b"trainer=", &quote(launch.trainer.as_os_str())]);
    line(&[b"token=", token.as_bytes()]);
    line(&[b"case \"${SLURM_ARRAY_TASK_ID:-}\" in"]);
    for (i, r) in runs.iter().enumerate() {
        let args: Vec<Vec<u8>> = launch.args(r).iter().map(|a| quote(a)).collect();
        line(&[format!("{i}) run=").as_bytes(), &quote(OsStr::new(&r.name)), b"; args=(", &args.join(&b' '), b") ;;"]);
    }
    line(&[b"*) echo \"error: this job script has no run for array task '${SLURM_ARRAY_TASK_ID:-}'; \
             submit it with cargo xtask sweep --backend slurm\" >&2; exit 2 ;;"]);
    line(&[b"esac"]);
    line(&[b"dir=$out/$run"]);
    line(&[b"# The folder the submitting machine sees holds this submission's token; without it this"]);
    line(&[b"# node would train into a folder nobody reads."]);
    line(&[b"if [ \"$(cat \"$out/", TOKEN.as_bytes(), b"\" 2>/dev/null)\" != \"$token\" ]; then"]);
    line(&[
        b"    msg=\"error: the output folder $out is not visible to the compute node $(hostname) (it lacks this \
          submission's marker ",
        TOKEN.as_bytes(),
        b"): put it on a shared filesystem\"",
    ]);
    line(&[b"    echo \"$msg\" >&2"]);
    line(&[b"    mkdir -p \"$dir\" 2>/dev/null && echo \"$msg\" >>\"$dir/train.log\""]);
    line(&[format!("    exit {NOT_VISIBLE_EXIT}").as_bytes()]);
    line(&[b"fi"]);
    line(&[b"mkdir -p \"$dir\" || exit 1"]);
    line(&[b"echo \"${SLURM_ARRAY_JOB_ID:-?} $SLURM_ARRAY_TASK_ID $(hostname)\" >\"$dir/", STARTED.as_bytes(), b"\""]);
    line(&[b"# As many threads as the task has CPUs."]);
    line(&[b"export RAYON_NUM_THREADS=\"${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}\""]);
    line(&[b"# Runs work from the workspace root, where recipes' relative data paths point."]);
    line(&[b"if ! cd \"$root\"; then"]);
    line(&[b"    echo \"error: the workspace $root is not visible to the compute node $(hostname); runs work \
          from it: put it on a shared filesystem\" | tee -a \"$dir/train.log\" >&2"]);
    line(&[b"    exit 1"]);
    line(&[b"fi"]);
    line(&[b"# exec: the trainer becomes the batch step's process, so that the time limit's SIGTERM"]);
    line(&[b"# (--signal=B:TERM) and scancel's reach it once and Slurm waits for it to stop with its"]);
    line(&[b"# checkpoint. A shell in between would get scancel's SIGTERM too, and passing it on"]);
    line(&[b"# would make it the trainer's second signal, which stops at once without a checkpoint."]);
    line(&[b"exec \"$trainer\" \"${args[@]}\" >\"$dir/", PROGRESS.as_bytes(), b"\" 2>>\"$dir/train.log\""]);
    s
}

/// The last progress line of a run (the trainer's JSON on stdout).
#[derive(Debug, Clone, Default)]
struct Live {
    step: u64,
    steps: u64,
    epoch: u64,
    epochs: u64,
    loss: Option<f64>,
    eta_s: Option<f64>,
}

impl Live {
    /// The last progress line in `dir`'s progress file, if it has one.
    fn read(dir: &Path) -> Option<Self> {
        let text = std::fs::read_to_string(dir.join(PROGRESS)).ok()?;
        let v: serde_json::Value = text.lines().rev().find_map(|l| serde_json::from_str(l).ok())?;
        Some(Self {
            step: v["step"].as_u64().unwrap_or(0),
            steps: v["steps"].as_u64().unwrap_or(0),
            epoch: v["epoch"].as_u64().unwrap_or(0),
            epochs: v["epochs"].as_u64().unwrap_or(0),
            loss: v["loss"].as_f64(),
            eta_s: v["eta_s"].as_f64(),
        })
    }
}

impl std::fmt::Display for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "epoch {}/{} step {}/{} loss {} eta {}",
            self.epoch,
            self.epochs,
            self.step,
            self.steps,
            self.loss.map_or("?".into(), |v| format!("{v:.3}")),
            self.eta_s.map_or("?".into(), fmt_secs)
        )
    }
}

/// Where a run stands, from its folder and what Slurm says of its task.
#[derive(Debug, Clone)]
enum RunState {
    /// It has its summary.
    Finished(Finished),
    /// Its task waits in the queue, for Slurm's reason.
    Pending(String),
    /// Its task runs on a node.
    Running { node: String, live: Option<Live> },
    /// Its task ended; it stopped with a checkpoint (scancel, the time limit), which resumes it.
    Interrupted,
    /// Its task ended and it failed.
    Failed { slurm: String, tail: String },
    /// Its task ended without a trace in its folder: the folder is not the nodes'.
    NotVisible { slurm: String },
    /// Its task was cancelled before it started.
    Cancelled,
    /// Slurm could not be asked; it has started (and has not finished).
    Unknown { live: Option<Live> },
    /// It is in no recorded submission and has not finished.
    Unsubmitted,
}

impl RunState {
    /// Whether the run has ended for good in this submission (any state but queued or running).
    fn done(&self) -> bool {
        !matches!(self, RunState::Pending(_) | RunState::Running { .. } | RunState::Unknown { .. })
    }
}

impl std::fmt::Display for RunState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunState::Finished(s) => {
                write!(f, "finished: {}, {:.1} ms/step", s.describe(), s.step_ms)
            }
            RunState::Pending(reason) => write!(f, "pending ({reason})"),
            RunState::Running { node, live: Some(l) } => write!(f, "running on {node}: {l}"),
            RunState::Running { node, live: None } => {
                write!(f, "running on {node}: loading data and building the model")
            }
            RunState::Interrupted => write!(f, "interrupted with a checkpoint, which the next submission resumes"),
            RunState::Failed { slurm, tail } => write!(f, "FAILED{slurm}: {tail}"),
            RunState::NotVisible { slurm } => write!(f, "FAILED{slurm}: it left no trace in its folder: {NOT_VISIBLE}"),
            RunState::Cancelled => write!(f, "cancelled before it started"),
            RunState::Unknown { live: Some(l) } => write!(f, "started (Slurm gave no state): {l}"),
            RunState::Unknown { live: None } => write!(f, "started or queued (Slurm gave no state)"),
            RunState::Unsubmitted => write!(f, "not submitted"),
        }
    }
}

/// Run `name`'s state. `tasks` is `squeue`'s view of the recorded job (`None` when it could not be
/// asked), `acct` sacct's (for tasks squeue no longer shows).
fn run_state(
    out: &Path,
    record: Option<&Record>,
    name: &str,
    tasks: Option<&HashMap<usize, Task>>,
    acct: &HashMap<usize, String>,
) -> RunState {
    let dir = out.join(name);
    if let Some(s) = finished(&dir) {
        return RunState::Finished(s);
    }
    let Some((record, i)) = record.and_then(|r| r.runs.iter().position(|n| n == name).map(|i| (r, i))) else {
        return RunState::Unsubmitted;
    };
    let task = tasks.and_then(|t| t.get(&i));
    match task {
        Some(t) if t.state == "PENDING" => return RunState::Pending(t.reason.clone()),
        Some(t) if !ended(&t.state) => return RunState::Running { node: t.node.clone(), live: Live::read(&dir) },
        _ => {}
    }
    // This submission's task started in this folder if it left its marker there.
    let started = std::fs::read_to_string(dir.join(STARTED))
        .is_ok_and(|m| m.split_whitespace().next() == Some(record.job.as_str()));
    if tasks.is_none() {
        return if started { RunState::Unknown { live: Live::read(&dir) } } else { RunState::Unknown { live: None } };
    }
    let slurm = match (task, acct.get(&i)) {
        (Some(t), _) if t.reason != "None" => format!(" (Slurm: {}, {})", t.state, t.reason),
        (Some(t), _) => format!(" (Slurm: {})", t.state),
        (None, Some(a)) => format!(" (Slurm: {a})"),
        (None, None) => String::new(),
    };
    let tail = last_lines(&dir.join("train.log"), 3);
    if started {
        if tail.contains(STOPPED) { RunState::Interrupted } else { RunState::Failed { slurm, tail } }
    } else if record.cancelled || task.is_some_and(|t| t.state == "CANCELLED") {
        RunState::Cancelled
    } else {
        RunState::NotVisible { slurm }
    }
}

/// The state of each of `names`, asking Slurm about the recorded job; a failure to ask is shown
/// once, as `warned`, rather than repeated every poll.
fn states(out: &Path, record: Option<&Record>, names: &[String], warned: &mut Option<String>) -> Vec<RunState> {
    let tasks = match record.map(|r| squeue(&r.job)).transpose() {
        Ok(t) => {
            *warned = None;
            t
        }
        Err(e) => {
            let msg = format!("{e:#}");
            if warned.as_deref() != Some(msg.as_str()) {
                eprintln!("warning: cannot ask Slurm about job {}: {msg}", record.map_or("?", |r| &r.job));
                *warned = Some(msg);
            }
            None
        }
    };
    // Accounting is asked only about tasks squeue has forgotten, which a follow loop never sees.
    let forgotten = record.is_some_and(|r| tasks.as_ref().is_some_and(|t| t.len() < r.runs.len()));
    let acct = match record {
        Some(r) if forgotten => sacct(&r.job),
        _ => HashMap::new(),
    };
    let tasks = if record.is_some() { tasks } else { Some(HashMap::new()) };
    names.iter().map(|n| run_state(out, record, n, tasks.as_ref(), &acct)).collect()
}

/// How a followed submission ended.
#[derive(Debug)]
pub struct Ended {
    /// Runs that failed, with what their state says.
    pub failed: Vec<(String, String)>,
    /// Runs stopped with a checkpoint or cancelled before they started: a new submission runs
    /// them.
    pub unfinished: Vec<String>,
    /// Whether a task could not see the sweep's folder.
    pub not_visible: bool,
}

/// Follows the recorded job until none of its tasks is queued or running, with a line per run as
/// it starts and ends and, every 15 seconds, each running run's progress, as the local backend
/// prints them; Ctrl-C stops following (the array goes on).
pub fn follow(out: &Path, record: &Record, stop: &AtomicBool) -> Result<Ended> {
    let names = &record.runs;
    let n = names.len();
    let started = Instant::now();
    let mut last_status = Instant::now();
    let mut warned = None;
    let mut failing_since: Option<Instant> = None;
    let mut before: Vec<Option<RunState>> = vec![None; n];
    let (mut begun, mut done) = (0, 0);
    loop {
        let now = states(out, Some(record), names, &mut warned);
        // A controller that stays unreachable ends the wait (the array goes on without it).
        match (&warned, failing_since) {
            (None, _) => failing_since = None,
            (Some(_), None) => failing_since = Some(Instant::now()),
            (Some(msg), Some(t)) if t.elapsed() > Duration::from_secs(600) => {
                bail!("cannot ask Slurm about job {} for 10 minutes ({msg}); --status or --wait asks again", record.job)
            }
            _ => {}
        }
        for (i, s) in now.iter().enumerate() {
            let name = &names[i];
            let was = before[i].as_ref();
            if matches!(s, RunState::Running { .. }) && !matches!(was, Some(RunState::Running { .. })) {
                let node = if let RunState::Running { node, .. } = s { node.as_str() } else { "?" };
                begun += 1;
                println!("[{begun}/{n}] started {name} on {node}");
            }
            if s.done() && !was.is_some_and(RunState::done) {
                // A run that started and ended between two looks counts as started too.
                if !matches!(was, Some(RunState::Running { .. })) {
                    begun += 1;
                }
                done += 1;
                match s {
                    RunState::Finished(f) => println!(
                        "[{done}/{n}] finished {name} in {}: {}, {:.1} ms/step",
                        fmt_secs(f.train_seconds),
                        f.describe(),
                        f.step_ms
                    ),
                    other => println!("[{done}/{n}] {name}: {other}"),
                }
            }
        }
        before = now.into_iter().map(Some).collect();
        if before.iter().all(|s| s.as_ref().is_some_and(RunState::done)) {
            break;
        }
        if stop.load(Ordering::Relaxed) {
            bail!(
                "stopped following job {} (its runs go on): --status shows them, --cancel stops them, \
                 --wait follows them again",
                record.job
            );
        }
        if last_status.elapsed() >= Duration::from_secs(15) {
            let (mut running, mut pending) = (0, 0);
            for (name, s) in names.iter().zip(&before) {
                match s {
                    Some(s @ (RunState::Running { .. } | RunState::Unknown { .. })) => {
                        running += 1;
                        println!("  {name}: {s}");
                    }
                    Some(RunState::Pending(_)) => pending += 1,
                    _ => {}
                }
            }
            println!(
                "  total: {done}/{n} runs ended, {running} running, {pending} pending, {} elapsed",
                fmt_secs(started.elapsed().as_secs_f64())
            );
            last_status = Instant::now();
        }
        // Slurm's controller answers many users: ask every 2 seconds, not more often.
        for _ in 0..10 {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let mut ended = Ended { failed: vec![], unfinished: vec![], not_visible: false };
    for (name, s) in names.iter().zip(before.into_iter().flatten()) {
        match s {
            RunState::Finished(_) => {}
            RunState::Interrupted | RunState::Cancelled | RunState::Unsubmitted => ended.unfinished.push(name.clone()),
            RunState::NotVisible { .. } => {
                ended.not_visible = true;
                ended.failed.push((name.clone(), s.to_string()));
            }
            other => ended.failed.push((name.clone(), other.to_string())),
        }
    }
    Ok(ended)
}

/// Prints each run's state (`--status`): from the run folders, and from `squeue` (and `sacct`
/// where the cluster keeps accounting) for the recorded job.
pub fn status(out: &Path, names: &[String]) -> Result<()> {
    let record = Record::load(out)?;
    match &record {
        Some(r) => {
            let ago = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(f64::NAN, |d| d.as_secs().saturating_sub(r.submitted) as f64);
            println!(
                "job {}: {} runs submitted {} ago{}",
                r.job,
                r.runs.len(),
                fmt_secs(ago),
                if r.cancelled { ", cancelled" } else { "" }
            );
        }
        None => println!("no Slurm job was submitted for {}; states from the run folders", out.display()),
    }
    let mut warned = None;
    let states = states(out, record.as_ref(), names, &mut warned);
    let width = names.iter().map(String::len).max().unwrap_or(0);
    for (name, s) in names.iter().zip(&states) {
        println!("  {name:<width$} {s}");
    }
    let count = |f: fn(&RunState) -> bool| states.iter().filter(|s| f(s)).count();
    println!(
        "{} of {} runs finished, {} running, {} pending, {} failed",
        count(|s| matches!(s, RunState::Finished(_))),
        names.len(),
        count(|s| matches!(s, RunState::Running { .. })),
        count(|s| matches!(s, RunState::Pending(_))),
        count(|s| matches!(s, RunState::Failed { .. } | RunState::NotVisible { .. }))
    );
    if states.iter().any(|s| matches!(s, RunState::NotVisible { .. })) {
        println!("{NOT_VISIBLE}");
    }
    Ok(())
}

/// Cancels the recorded job (`--cancel`) and waits, up to two minutes, for its running runs to
/// stop after their step with a checkpoint.
pub fn cancel(out: &Path) -> Result<()> {
    let Some(mut record) = Record::load(out)? else {
        bail!("no Slurm job was submitted for {}: nothing to cancel", out.display());
    };
    run_slurm("scancel", [record.job.as_str()])?;
    record.cancelled = true;
    record.save(out)?;
    println!("cancelled job {}: its running runs stop after their step with a checkpoint", record.job);
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(120) {
        if squeue(&record.job)?.values().all(|t| ended(&t.state)) {
            println!("job {} has ended; the next submission resumes its runs", record.job);
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    println!("job {} is still ending; --status shows when it has", record.job);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_keeps_every_byte_for_bash() {
        assert_eq!(quote(OsStr::new("a b")), b"'a b'");
        assert_eq!(quote(OsStr::new("it's")), b"'it'\\''s'");
        assert_eq!(quote(OsStr::new("quant.precision=\"int8\"")), b"'quant.precision=\"int8\"'");
    }

    #[test]
    fn tokens_differ() {
        assert_ne!(random_token(), random_token());
        assert_eq!(random_token().len(), 32);
    }
}
