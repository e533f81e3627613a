//! Measuring the process on the other end of the agent's socket, from `/proc`.
//!
//! Everything here blocks (file reads); the agent runs it on tokio's blocking pool.

use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use ring::digest;

use crate::error::AttestationError;
use crate::ids::Measurement;

/// Which file an executable is, independent of its path.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    fn of(metadata: &fs::Metadata) -> Self {
        Self {
            dev: metadata.dev(),
            ino: metadata.ino(),
        }
    }
}

/// A process pinned down well enough to notice that it changed: its start time tells a
/// reused pid from the original process, the executable's identity tells an `execve`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct CallerIdentity {
    pid: i32,
    start_time: u64,
    exe: FileId,
}

fn proc_path(pid: i32, entry: &str) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/{entry}"))
}

fn not_measurable(pid: i32) -> impl Fn(io::Error) -> AttestationError {
    move |source| AttestationError::CallerNotMeasurable { pid, source }
}

/// The process start time (field 22 of `/proc/<pid>/stat`, in clock ticks since boot).
/// The command name (field 2) may contain spaces and parentheses, so fields are counted
/// from the last `)`.
fn parse_start_time(stat: &str) -> Option<u64> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    // Fields after the name start at field 3 (state); field 22 is the 20th of them.
    after_comm.split_ascii_whitespace().nth(19)?.parse().ok()
}

/// The pid of the process tracing this one, from `/proc/<pid>/status` (0: not traced).
fn parse_tracer_pid(status: &str) -> Option<i32> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("TracerPid:"))?
        .trim()
        .parse()
        .ok()
}

impl CallerIdentity {
    /// Pins down process `pid` as it is now.
    pub(crate) fn of(pid: i32) -> Result<Self, AttestationError> {
        let stat = fs::read_to_string(proc_path(pid, "stat")).map_err(not_measurable(pid))?;
        let start_time = parse_start_time(&stat).ok_or_else(|| {
            not_measurable(pid)(io::Error::new(
                io::ErrorKind::InvalidData,
                "unreadable /proc stat line",
            ))
        })?;
        let exe = fs::metadata(proc_path(pid, "exe")).map_err(not_measurable(pid))?;
        Ok(Self {
            pid,
            start_time,
            exe: FileId::of(&exe),
        })
    }

    /// The caller's process id.
    pub(crate) fn pid(&self) -> i32 {
        self.pid
    }

    /// Hashes the executable of the process identified earlier, and checks that the process
    /// is still the same one, running the same file, after hashing: a process that exited
    /// (its pid possibly reused) or executed another program is refused with
    /// [`AttestationError::CallerChanged`], and a traced one with
    /// [`AttestationError::CallerTraced`] (its tracer could make it send anything).
    pub(crate) fn measure(&self) -> Result<Measurement, AttestationError> {
        let pid = self.pid;
        // Opening the magic link opens the very file the process runs, even if its path
        // has since been renamed or replaced; the open file cannot change under us.
        let mut exe = File::open(proc_path(pid, "exe")).map_err(not_measurable(pid))?;
        let opened = FileId::of(&exe.metadata().map_err(not_measurable(pid))?);
        let mut ctx = digest::Context::new(&digest::SHA256);
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = exe.read(&mut buf).map_err(not_measurable(pid))?;
            if n == 0 {
                break;
            }
            ctx.update(&buf[..n]);
        }
        let status = fs::read_to_string(proc_path(pid, "status")).map_err(not_measurable(pid))?;
        match parse_tracer_pid(&status) {
            Some(0) => {}
            Some(_) => return Err(AttestationError::CallerTraced { pid }),
            None => {
                return Err(not_measurable(pid)(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "unreadable /proc status",
                )));
            }
        }
        let now = Self::of(pid).map_err(|_| AttestationError::CallerChanged { pid })?;
        if now != *self || opened != self.exe {
            return Err(AttestationError::CallerChanged { pid });
        }
        let mut measurement = [0u8; 32];
        measurement.copy_from_slice(ctx.finish().as_ref());
        Ok(Measurement(measurement))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_is_field_22_even_with_odd_command_names() {
        let stat = "4242 (a) b (c) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 \
                    987654 1000 200 18446744073709551615";
        assert_eq!(parse_start_time(stat), Some(987_654));
        assert_eq!(parse_start_time("1 (x) S 1 2"), None);
    }

    #[test]
    fn tracer_pid_is_read_from_status() {
        let status = "Name:\tx\nState:\tS (sleeping)\nTracerPid:\t 77\nUid:\t0\n";
        assert_eq!(parse_tracer_pid(status), Some(77));
        assert_eq!(parse_tracer_pid("Name:\tx\n"), None);
    }

    #[test]
    fn measures_this_process_as_the_sha256_of_its_executable() {
        let pid = i32::try_from(std::process::id()).unwrap();
        let identity = CallerIdentity::of(pid).unwrap();
        let exe = fs::read(std::env::current_exe().unwrap()).unwrap();
        let expected = digest::digest(&digest::SHA256, &exe);
        assert_eq!(identity.measure().unwrap().0.as_slice(), expected.as_ref());
    }

    #[test]
    fn a_process_that_executes_another_program_is_noticed() {
        use std::io::{BufRead, BufReader, Write};
        use std::process::{Command, Stdio};

        // A python process that, when told, replaces itself with `sleep`.
        let mut child = Command::new("python3")
            .args([
                "-c",
                "import os, sys; print('ready', flush=True); sys.stdin.readline(); \
                 os.execv('/bin/sleep', ['sleep', '30'])",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut ready = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut ready)
            .unwrap();
        let pid = i32::try_from(child.id()).unwrap();
        let before = CallerIdentity::of(pid).unwrap();
        let python_exe = fs::metadata(proc_path(pid, "exe")).unwrap().ino();
        writeln!(child.stdin.take().unwrap()).unwrap();
        // Wait (without a deadline) until the exec has happened.
        while fs::metadata(proc_path(pid, "exe")).unwrap().ino() == python_exe {
            std::thread::yield_now();
        }
        let result = before.measure();
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(
            matches!(result, Err(AttestationError::CallerChanged { pid: p }) if p == pid),
            "{result:?}"
        );
    }
}
