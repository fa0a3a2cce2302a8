//! Running a sweep's runs as local processes, up to `--jobs` at once, each with an equal share of
//! the cores, with a progress line per run every 15 seconds (from the trainers' JSON progress)
//! and Ctrl-C passed on once so that each run stops with a checkpoint.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::experiment::PlannedRun;
use super::report::finished;
use super::{Launch, fmt_secs, last_lines};

/// Threads each of `jobs` runs gets: an equal share of the cores.
pub fn threads_per_run(jobs: usize) -> usize {
    (std::thread::available_parallelism().map_or(1, |n| n.get()) / jobs.max(1)).max(1)
}

/// The live state of one run, for the progress lines.
#[derive(Debug, Clone, Default)]
struct Live {
    step: u64,
    steps: u64,
    epoch: u64,
    epochs: u64,
    loss: Option<f64>,
    eta_s: Option<f64>,
}

/// A pool of local trainer processes.
#[derive(Debug, Clone, Copy)]
pub struct Pool {
    /// Runs at once.
    pub jobs: usize,
    /// Threads per run.
    pub threads: usize,
}

impl Pool {
    /// Runs `runs[i]` for each `i` of `todo`, in that order; `done` runs ended before. Returns
    /// the runs that failed, with the end of their logs.
    pub fn run(
        &self,
        launch: &Launch<'_>,
        runs: &[PlannedRun],
        todo: &[usize],
        mut done: usize,
        stop: &AtomicBool,
    ) -> Result<Vec<(String, String)>> {
        let live: Arc<Mutex<HashMap<String, Live>>> = Arc::default();
        let mut queue = todo.iter().copied();
        let mut active: Vec<(usize, Child, Instant)> = Vec::new();
        let mut failed: Vec<(String, String)> = Vec::new();
        let started = Instant::now();
        let mut last_status = Instant::now();
        let mut forwarded = false;
        loop {
            while active.len() < self.jobs && !stop.load(Ordering::Relaxed) {
                let Some(i) = queue.next() else { break };
                let r = &runs[i];
                let child = self.start(launch, r, live.clone())?;
                println!("[{}/{}] started {}", done + active.len() + 1, runs.len(), r.name);
                active.push((i, child, Instant::now()));
            }
            if active.is_empty() {
                break;
            }
            if stop.load(Ordering::Relaxed) && !forwarded {
                forwarded = true;
                println!("stopping: each running run saves a checkpoint and exits; no new runs start");
                for (_, child, _) in &active {
                    let _ = Command::new("kill").args(["-INT", &child.id().to_string()]).status();
                }
            }
            std::thread::sleep(Duration::from_millis(200));
            let mut k = 0;
            while k < active.len() {
                let (i, child, t0) = &mut active[k];
                if let Some(status) = child.try_wait()? {
                    let r = &runs[*i];
                    let dir = launch.out.join(&r.name);
                    done += 1;
                    match finished(&dir) {
                        Some(s) if status.success() => println!(
                            "[{done}/{}] finished {} in {}: {}, {:.1} ms/step",
                            runs.len(),
                            r.name,
                            fmt_secs(t0.elapsed().as_secs_f64()),
                            s.describe(),
                            s.step_ms
                        ),
                        _ if stop.load(Ordering::Relaxed) => {
                            println!("[{done}/{}] interrupted {} (its checkpoint resumes it)", runs.len(), r.name);
                        }
                        _ => {
                            let tail = last_lines(&dir.join("train.log"), 3);
                            println!("[{done}/{}] FAILED {} ({status}): {tail}", runs.len(), r.name);
                            failed.push((r.name.clone(), tail));
                        }
                    }
                    live.lock().unwrap_or_else(|e| e.into_inner()).remove(&r.name);
                    active.remove(k);
                } else {
                    k += 1;
                }
            }
            if last_status.elapsed() >= Duration::from_secs(15) && !active.is_empty() {
                let l = live.lock().unwrap_or_else(|e| e.into_inner());
                for (i, _, _) in &active {
                    let name = &runs[*i].name;
                    match l.get(name) {
                        Some(p) => println!(
                            "  {name}: epoch {}/{} step {}/{} loss {} eta {}",
                            p.epoch,
                            p.epochs,
                            p.step,
                            p.steps,
                            p.loss.map_or("?".into(), |v| format!("{v:.3}")),
                            p.eta_s.map_or("?".into(), fmt_secs)
                        ),
                        None => println!("  {name}: loading data and building the model"),
                    }
                }
                println!(
                    "  total: {done}/{} runs ended, {} to go, {} elapsed",
                    runs.len(),
                    runs.len() - done,
                    fmt_secs(started.elapsed().as_secs_f64())
                );
                last_status = Instant::now();
            }
        }
        Ok(failed)
    }

    /// Starts one run's trainer, its stderr appended to the run's `train.log` and its JSON
    /// progress read into `live`.
    fn start(&self, launch: &Launch<'_>, r: &PlannedRun, live: Arc<Mutex<HashMap<String, Live>>>) -> Result<Child> {
        let dir = launch.out.join(&r.name);
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("train.log"))
            .with_context(|| format!("cannot open {}", dir.join("train.log").display()))?;
        let mut cmd = Command::new(launch.trainer);
        cmd.current_dir(launch.root).args(launch.args(r));
        cmd.env("RAYON_NUM_THREADS", self.threads.to_string()).stdout(Stdio::piped()).stderr(log);
        // Each run in its own process group: a Ctrl-C at the terminal reaches the sweep only,
        // which passes it on once, so that each run stops with a checkpoint.
        #[cfg(unix)]
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd.spawn().with_context(|| format!("cannot start {}", launch.trainer.display()))?;
        let stdout = child.stdout.take().context("no stdout from the trainer")?;
        let name = r.name.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    let l = Live {
                        step: v["step"].as_u64().unwrap_or(0),
                        steps: v["steps"].as_u64().unwrap_or(0),
                        epoch: v["epoch"].as_u64().unwrap_or(0),
                        epochs: v["epochs"].as_u64().unwrap_or(0),
                        loss: v["loss"].as_f64(),
                        eta_s: v["eta_s"].as_f64(),
                    };
                    live.lock().unwrap_or_else(|e| e.into_inner()).insert(name.clone(), l);
                }
            }
        });
        Ok(child)
    }
}
