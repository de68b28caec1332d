//! Launching a test binary's own worker test under `mpirun` (the MPI tests re-run themselves).

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Whether this process is a rank started by `mpirun`.
pub fn under_mpi() -> bool {
    std::env::var_os("OMPI_COMM_WORLD_SIZE").is_some()
}

/// Runs the test `name` of the current test binary under `mpirun -np np --oversubscribe` with the
/// extra environment `envs`; returns (success, stdout + stderr, elapsed). Panics with the output
/// when the job runs past `limit` (it is killed first).
pub fn mpirun(
    np: usize,
    name: &str,
    envs: &[(&str, &std::ffi::OsStr)],
    limit: Duration,
) -> (bool, String, Duration) {
    let exe = std::env::current_exe().unwrap();
    let start = Instant::now();
    let mut cmd = Command::new("mpirun");
    cmd.args(["--allow-run-as-root", "--oversubscribe", "-np"])
        .arg(np.to_string())
        .arg(&exe)
        .args([name, "--exact", "--nocapture", "--test-threads=1"]);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mpirun not found: install openmpi-bin (see .ci/run)");
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        out.read_to_string(&mut s).ok();
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        err.read_to_string(&mut s).ok();
        s
    });
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if start.elapsed() > limit {
            child.kill().ok();
            child.wait().ok();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = format!("{}{}", t_out.join().unwrap(), t_err.join().unwrap());
    let elapsed = start.elapsed();
    match status {
        Some(s) => (s.success(), text, elapsed),
        None => panic!("mpirun -np {np} {name} hung past {limit:?}:\n{text}"),
    }
}
