//! The Slurm backend end to end, against a real single-node Slurm that this test starts on the
//! loopback address (`tests/slurm/start.sh`: slurmctld and slurmd from `slurm.conf.in`, auth/none,
//! no munge) and stops by their process ids when it ends, failed or not (the [`Slurm`] guard):
//! `experiments/ci.toml` through `--backend slurm --wait` gives the local backend's tables; a
//! slower copy of it is cancelled part way, resubmitted, and every run resumes from its checkpoint;
//! a third submission submits nothing; a sweep folder the tasks do not see as the submitter does
//! is reported as such; sbatch's refusals show Slurm's own messages. If Slurm cannot be started
//! here the test fails with the daemons' output: it never skips.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

const RUNS: [&str; 3] = [
    "cnn-small-fashion-mnist-fp32-s0",
    "cnn-small-fashion-mnist-int8-dsgc_on-s0",
    "cnn-small-fashion-mnist-int8-dsgc_off-s0",
];

/// What makes the runs of `ci` last long enough (300 steps, some seconds each) to be cancelled
/// part way, with checkpoints every 4 steps as in `ci` itself.
const SLOW: [&str; 2] = ["--set", "data.train_limit=9600"];

/// Two ports nothing listens on now, for slurmctld and slurmd.
fn free_ports() -> (u16, u16) {
    let a = TcpListener::bind("127.0.0.1:0").unwrap();
    let b = TcpListener::bind("127.0.0.1:0").unwrap();
    (a.local_addr().unwrap().port(), b.local_addr().unwrap().port())
}

/// A running single-node Slurm; dropping it cancels its jobs and stops its daemons by their
/// process ids (as start.sh recorded them).
struct Slurm {
    dir: tempfile::TempDir,
}

impl Slurm {
    fn start() -> Slurm {
        let slurm = Slurm { dir: tempfile::tempdir().unwrap() };
        let (ctld, slurmd) = free_ports();
        let out = Command::new("bash")
            .arg(root().join("xtask/tests/slurm/start.sh"))
            .arg(slurm.dir.path())
            .args([ctld.to_string(), slurmd.to_string()])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        eprintln!("{stderr}");
        // On failure the guard still stops whichever daemon did start.
        assert!(out.status.success(), "cannot start a single-node Slurm on this machine:\n{stderr}");
        slurm
    }

    fn conf(&self) -> PathBuf {
        self.dir.path().join("slurm.conf")
    }

    /// A Slurm client command of this cluster.
    fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("SLURM_CONF", self.conf());
        c
    }

    /// The ids of the jobs this cluster still shows as queued, running or ending.
    fn jobs(&self) -> Vec<String> {
        let out = self.cmd("squeue").args(["-h", "-o", "%A"]).output();
        out.map(|o| String::from_utf8_lossy(&o.stdout).split_whitespace().map(String::from).collect())
            .unwrap_or_default()
    }

    /// Waits until no job is queued or running.
    fn wait_idle(&self, limit: Duration) -> bool {
        let t0 = Instant::now();
        while t0.elapsed() < limit {
            if self.jobs().is_empty() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        false
    }
}

impl Drop for Slurm {
    fn drop(&mut self) {
        // The jobs first, so that no trainer outlives the daemons that track it.
        let jobs = self.jobs();
        if !jobs.is_empty() {
            let _ = self.cmd("scancel").args(&jobs).status();
            self.wait_idle(Duration::from_secs(60));
        }
        for daemon in ["slurmd", "slurmctld"] {
            let Ok(pid) = std::fs::read_to_string(self.dir.path().join(format!("{daemon}.pid"))) else { continue };
            let pid = pid.trim().to_string();
            // Only that daemon, by its id: a reused id of another process is left alone.
            let alive = || {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                let zombie = stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z'));
                comm.trim() == daemon && !zombie
            };
            if !alive() {
                continue;
            }
            let _ = Command::new("kill").args(["-TERM", &pid]).status();
            let t0 = Instant::now();
            while alive() && t0.elapsed() < Duration::from_secs(15) {
                std::thread::sleep(Duration::from_millis(100));
            }
            if alive() {
                let _ = Command::new("kill").args(["-KILL", &pid]).status();
            }
        }
    }
}

/// `cargo xtask sweep ci --out OUT ARGS...` against `slurm`'s cluster.
fn sweep_cmd(slurm: &Slurm, out: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_xtask"));
    cmd.current_dir(root()).args(["sweep", "ci", "--out"]).arg(out).args(args);
    cmd.env("SLURM_CONF", slurm.conf()).env_remove("INT8_TRAIN_KILL_AT_STEP");
    cmd
}

/// Runs `cargo xtask sweep ci --out OUT ARGS...` against `slurm`'s cluster.
fn sweep(slurm: &Slurm, out: &Path, args: &[&str]) -> Output {
    let output = sweep_cmd(slurm, out, args).output().unwrap();
    eprintln!("{}\n{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    output
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn read(path: impl AsRef<Path>) -> String {
    std::fs::read_to_string(path.as_ref()).unwrap_or_else(|e| panic!("{}: {e}", path.as_ref().display()))
}

/// The recorded job id of a sweep.
fn job(out: &Path) -> String {
    let v: serde_json::Value = serde_json::from_str(&read(out.join("slurm-job.json"))).unwrap();
    v["job"].as_str().unwrap().to_string()
}

/// A results.csv's header, and its rows by run name.
fn table(out: &Path) -> (String, Vec<Vec<String>>) {
    let csv = read(out.join("results.csv"));
    let mut lines = csv.lines();
    let header = lines.next().unwrap().to_string();
    let mut rows: Vec<Vec<String>> = lines.map(|l| l.split(',').map(String::from).collect()).collect();
    rows.sort();
    (header, rows)
}

#[test]
fn a_sweep_runs_on_slurm_is_cancelled_resumes_and_finishes() {
    assert!(
        Path::new("/usr/share/datasets/fashion-mnist").exists(),
        "Fashion-MNIST is missing: apt-get install -y dataset-fashion-mnist (the README's set-up does it)"
    );
    let slurm = Slurm::start();
    let dir = tempfile::tempdir().unwrap();

    // The local backend's tables, to compare with.
    let local = dir.path().join("local");
    let l = sweep(&slurm, &local, &[]);
    assert!(l.status.success());

    // 1. Submitted and followed to the end, two runs at a time, one thread each.
    let a = dir.path().join("a");
    let first = sweep(&slurm, &a, &["--backend", "slurm", "--wait", "--max-parallel", "2", "--cpus-per-task", "1"]);
    assert!(first.status.success(), "{}", stderr(&first));
    let s = stdout(&first);
    let job_a = job(&a);
    assert!(s.contains("submitted job") && s.contains("as array tasks 0-2, 2 at a time"), "{s}");
    let (header, rows) = table(&a);
    let (local_header, local_rows) = table(&local);
    assert_eq!(header, local_header);
    assert_eq!(rows.len(), 3);
    assert_eq!(rows.len(), local_rows.len());
    for (row, local_row) in rows.iter().zip(&local_rows) {
        // Name, model, dataset, precision, dsgc, dclr, seed and epochs as locally.
        assert_eq!(row[..8], local_row[..8]);
        let top1: f64 = row[8].parse().unwrap();
        assert!(top1 > 10.0 && top1 <= 100.0, "{row:?}: no better than chance");
    }
    for run in RUNS {
        assert!(s.contains(&format!("finished {run} in")), "{s}");
        let progress = read(a.join(run).join("progress.jsonl"));
        assert!(progress.contains("\"step\":12"), "{run}: the trainer's progress lines: {progress}");
        assert!(read(a.join(run).join("slurm-task")).starts_with(&job_a));
    }
    assert!(a.join("slurm-job.sh").exists() && a.join(".int8-train").exists());
    // After the array: --status reads the finished runs, --tables writes the same table again.
    let status = sweep(&slurm, &a, &["--status"]);
    assert!(status.status.success(), "{}", stderr(&status));
    assert!(stdout(&status).contains("3 of 3 runs finished, 0 running, 0 pending, 0 failed"), "{}", stdout(&status));
    let csv = read(a.join("results.csv"));
    std::fs::remove_file(a.join("results.csv")).unwrap();
    let tables = sweep(&slurm, &a, &["--backend", "slurm", "--tables"]);
    assert!(tables.status.success(), "{}", stderr(&tables));
    assert_eq!(read(a.join("results.csv")), csv);
    assert_eq!(job(&a), job_a, "--tables submits nothing");

    // 2. Longer runs, all three at once, cancelled once each has a checkpoint.
    let b = dir.path().join("b");
    let submit: Vec<&str> = [&["--backend", "slurm", "--cpus-per-task", "1", "--time", "00:10:00"][..], &SLOW].concat();
    let second = sweep(&slurm, &b, &submit);
    assert!(second.status.success(), "{}", stderr(&second));
    assert!(stdout(&second).contains("--status"), "says how to follow");
    let job_b = job(&b);
    let t0 = Instant::now();
    loop {
        let done = RUNS.iter().filter(|r| b.join(r).join("summary.json").exists()).count();
        assert_eq!(done, 0, "a run finished before it could be cancelled part way: make SLOW slower");
        if RUNS.iter().all(|r| b.join(r).join("checkpoints/last.safetensors").exists()) {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(180), "the runs wrote no checkpoint in 3 minutes");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The first run gets the SIGTERM of its time limit (`--signal=B:TERM@120`): Slurm signals the
    // batch step's process, which is the trainer.
    let task0 = format!("{job_b}_0");
    assert!(slurm.cmd("scancel").args(["--batch", "--signal=TERM", &task0]).status().unwrap().success());
    let t0 = Instant::now();
    while !read(b.join(RUNS[0]).join("train.log")).contains("stopped by the user at step") {
        assert!(t0.elapsed() < Duration::from_secs(60), "the batch step's SIGTERM did not stop the trainer");
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = sweep(&slurm, &b, &["--status"]);
    assert!(status.status.success());
    assert!(stdout(&status).contains(&format!("job {job_b}: 3 runs submitted")), "{}", stdout(&status));
    assert!(stdout(&status).contains("running on localhost"), "{}", stdout(&status));
    // The others are cancelled.
    let cancel = sweep(&slurm, &b, &["--cancel"]);
    assert!(cancel.status.success(), "{}", stderr(&cancel));
    assert!(stdout(&cancel).contains(&format!("job {job_b} has ended")), "{}", stdout(&cancel));
    for run in RUNS {
        assert!(!b.join(run).join("summary.json").exists(), "{run} was cancelled part way");
        let log = read(b.join(run).join("train.log"));
        assert!(log.contains("stopped by the user at step"), "{run} stopped on SIGTERM with a checkpoint:\n{log}");
    }
    let status = sweep(&slurm, &b, &["--status"]);
    assert_eq!(stdout(&status).matches("interrupted with a checkpoint").count(), 3, "{}", stdout(&status));

    // Resubmitted: every run resumes from its checkpoint and finishes.
    let wait: Vec<&str> = [&submit[..], &["--wait"]].concat();
    let third = sweep(&slurm, &b, &wait);
    assert!(third.status.success(), "{}", stderr(&third));
    assert_ne!(job(&b), job_b, "a new array");
    for run in RUNS {
        let log = read(b.join(run).join("train.log"));
        assert!(log.contains("resuming at step"), "{run} resumed from its checkpoint:\n{log}");
        assert!(b.join(run).join("summary.json").exists());
    }
    assert_eq!(table(&b).1.len(), 3);

    // 3. Nothing is left to submit.
    let record = read(b.join("slurm-job.json"));
    let fourth = sweep(&slurm, &b, &wait);
    assert!(fourth.status.success(), "{}", stderr(&fourth));
    assert!(stdout(&fourth).contains("all 3 runs finished: nothing to submit"), "{}", stdout(&fourth));
    assert_eq!(read(b.join("slurm-job.json")), record, "no new job");

    // 4. A folder the tasks see without this submission's marker (a node-local one of the same
    // name, say) is reported, by the task in its log and by --wait and --status. The array is
    // held until --wait follows it (a second submission would bring a marker of its own).
    let c = dir.path().join("c");
    let held = sweep(&slurm, &c, &["--backend", "slurm", "--cpus-per-task", "1", "--sbatch-arg=--hold"]);
    assert!(held.status.success(), "{}", stderr(&held));
    std::fs::write(c.join(".slurm-token"), "another folder's marker").unwrap();
    let mut follower = sweep_cmd(&slurm, &c, &["--backend", "slurm", "--wait"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(follower.stdout.take().unwrap()).lines().map_while(Result::ok);
    let mut seen = String::new();
    for line in lines.by_ref() {
        seen += &format!("{line}\n");
        if line.contains("still queued or running: following it") {
            break;
        }
    }
    assert!(seen.contains("following it"), "--wait follows the held array:\n{seen}");
    assert!(slurm.cmd("scontrol").args(["release", &job(&c)]).status().unwrap().success());
    lines.for_each(|l| seen += &format!("{l}\n"));
    let followed = follower.wait_with_output().unwrap();
    eprintln!("{seen}\n{}", stderr(&followed));
    assert!(!followed.status.success());
    let msg = "the output folder is not visible to the compute nodes: put it on a shared filesystem";
    assert!(stderr(&followed).contains(msg), "{}", stderr(&followed));
    assert!(read(c.join(RUNS[0]).join("train.log")).contains("is not visible to the compute node"));
    let status = sweep(&slurm, &c, &["--status"]);
    assert!(stdout(&status).contains(msg), "{}", stdout(&status));

    // 5. A request the cluster cannot meet is refused with Slurm's own message.
    let d = dir.path().join("d");
    let gpus = sweep(&slurm, &d, &["--backend", "slurm", "--gpus-per-task", "1"]);
    assert!(!gpus.status.success());
    assert!(stderr(&gpus).contains("sbatch refused the sweep's job array"), "{}", stderr(&gpus));
    assert!(stderr(&gpus).contains("Invalid generic resource"), "Slurm's message: {}", stderr(&gpus));
    assert!(!d.join("slurm-job.json").exists());

    assert!(slurm.wait_idle(Duration::from_secs(30)), "no job is left: {:?}", slurm.jobs());
}

#[test]
fn without_slurm_s_client_the_sweep_says_what_to_install() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .current_dir(root())
        .args(["sweep", "ci", "--backend", "slurm", "--out"])
        .arg(dir.path().join("out"))
        .env("PATH", dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("install slurm-client, or run on a login node"), "{}", stderr(&out));
    assert!(!dir.path().join("out").exists(), "nothing was written");
}

#[test]
fn an_unreachable_controller_is_reported_with_slurm_s_message() {
    // The test cluster's configuration, with a controller port nothing listens on.
    let dir = tempfile::tempdir().unwrap();
    let (ctld, slurmd) = free_ports();
    let conf = read(root().join("xtask/tests/slurm/slurm.conf.in"))
        .replace("@DIR@", &dir.path().display().to_string())
        .replace("@CTLD_PORT@", &ctld.to_string())
        .replace("@SLURMD_PORT@", &slurmd.to_string())
        .replace("@USER@", "root");
    std::fs::write(dir.path().join("slurm.conf"), conf).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .current_dir(root())
        .args(["sweep", "ci", "--backend", "slurm", "--out"])
        .arg(dir.path().join("out"))
        .env("SLURM_CONF", dir.path().join("slurm.conf"))
        .env_remove("INT8_TRAIN_KILL_AT_STEP")
        .output()
        .unwrap();
    eprintln!("{}\n{}", stdout(&out), stderr(&out));
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("sbatch") && err.contains("Unable to contact slurm controller"), "{err}");
    assert!(!dir.path().join("out/slurm-job.json").exists());
}
