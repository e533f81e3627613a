//! Measuring the process on the other end of the agent's socket, from `/proc`.
//!
//! Everything here blocks (file reads); the agent runs it on tokio's blocking pool.
//!
//! # The measurement cache
//!
//! Hashing the caller's executable on every quote costs a full read and SHA-256 of a file
//! that may be hundreds of megabytes, on every function cold start. The agent therefore
//! remembers each executable's measurement, keyed by the file's identity as the kernel
//! reports it through the descriptor the agent opened on `/proc/<pid>/exe` (the very
//! file the process runs): device, inode, size, and modification and status-change
//! times in nanoseconds ([`ExecutableIdentity`]). The identity is read before hashing and
//! again after; a measurement is cached only if the two agree, and any difference on a
//! later quote means the file is hashed again.
//!
//! What this trusts: that a file's content cannot change while its status-change time
//! (ctime) stays the same. Any write, truncation or `utimensat` sets ctime to the current
//! time, and no system call lets an unprivileged user set it back, so an in-place rewrite
//! (even one that restores size and mtime) gives a new identity. A replaced file (rename
//! over, or delete and recreate) is another inode, or the same inode number with a new
//! ctime. While a process runs a file, the kernel also refuses to open it for writing
//! (`ETXTBSY`).
//!
//! What it does not protect against: root, who can set the clock back, write the block
//! device underneath the filesystem, or edit inode times offline; a filesystem that
//! does not keep ctime honestly (a network filesystem whose server lies, a FUSE
//! filesystem run by the attacker); and timestamps coarser than the time between two
//! writes, which matters only for a file modified again within one clock tick of the
//! version that was measured. A software TEE trusts root and the host kernel anyway (see
//! the crate documentation); a hardware TEE measures in the CPU and needs no such cache.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

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

/// What identifies an executable's content without reading it (see the module docs for
/// what this trusts).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub(crate) struct ExecutableIdentity {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl ExecutableIdentity {
    fn of(metadata: &fs::Metadata) -> Self {
        let ns = |secs: i64, nanos: i64| i128::from(secs) * 1_000_000_000 + i128::from(nanos);
        Self {
            dev: metadata.dev(),
            ino: metadata.ino(),
            size: metadata.size(),
            mtime_ns: ns(metadata.mtime(), metadata.mtime_nsec()),
            ctime_ns: ns(metadata.ctime(), metadata.ctime_nsec()),
        }
    }
}

/// How many executables the agent remembers; when full it forgets them all (a host runs
/// a handful of function builds, and forgetting only costs a hash).
const MEASUREMENT_CACHE_ENTRIES: usize = 64;

/// Measurements of executables already hashed, by [`ExecutableIdentity`].
#[derive(Debug, Default)]
pub(crate) struct MeasurementCache {
    measurements: Mutex<HashMap<ExecutableIdentity, Measurement>>,
    hashes: AtomicU64,
}

impl MeasurementCache {
    /// How many executables were hashed (cache misses) so far.
    pub(crate) fn hashes(&self) -> u64 {
        self.hashes.load(Ordering::Relaxed)
    }

    fn get(&self, identity: &ExecutableIdentity) -> Option<Measurement> {
        // A panic while holding the lock cannot leave the map inconsistent (each
        // operation is one call), so a poisoned lock is still usable.
        let map = self.measurements.lock().unwrap_or_else(|e| e.into_inner());
        map.get(identity).copied()
    }

    /// Measures the executable open as `file`, from the cache if this very file was hashed
    /// before, else by hashing it and, if it did not change while it was read, remembering
    /// the result. `Ok(None)`: it changed meanwhile, and what was hashed is no version of it.
    fn measure_open_file(&self, file: &mut File) -> io::Result<Option<Measurement>> {
        let before = ExecutableIdentity::of(&file.metadata()?);
        if let Some(measurement) = self.get(&before) {
            return Ok(Some(measurement));
        }
        let measurement = hash_file(file)?;
        self.hashes.fetch_add(1, Ordering::Relaxed);
        if ExecutableIdentity::of(&file.metadata()?) != before {
            return Ok(None);
        }
        self.insert(before, measurement);
        Ok(Some(measurement))
    }

    /// Measures the executable at `path` ahead of any quote, so that the first function
    /// running it does not wait for the hash. The cache key is the file's identity, as for
    /// a caller's executable: a function running this very file finds it; a changed or
    /// replaced file does not match and is hashed on its quote.
    pub(crate) fn prewarm(&self, path: &std::path::Path) -> io::Result<Measurement> {
        self.measure_open_file(&mut File::open(path)?)?
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::Interrupted,
                    "the file changed while it was read",
                )
            })
    }

    fn insert(&self, identity: ExecutableIdentity, measurement: Measurement) {
        let mut map = self.measurements.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MEASUREMENT_CACHE_ENTRIES {
            map.clear();
        }
        map.insert(identity, measurement);
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

    /// Measures the executable of the process identified earlier: from `cache` if this
    /// very file (same [`ExecutableIdentity`]) was hashed before, else by hashing it.
    /// Then checks that the process is still the same one, running the same file: a
    /// process that exited (its pid possibly reused) or executed another program is
    /// refused with [`AttestationError::CallerChanged`], and a traced one with
    /// [`AttestationError::CallerTraced`] (its tracer could make it send anything).
    pub(crate) fn measure(
        &self,
        cache: &MeasurementCache,
    ) -> Result<Measurement, AttestationError> {
        let pid = self.pid;
        // Opening the magic link opens the very file the process runs, even if its path
        // has since been renamed or replaced; the open file cannot change under us.
        let mut exe = File::open(proc_path(pid, "exe")).map_err(not_measurable(pid))?;
        let opened = FileId::of(&exe.metadata().map_err(not_measurable(pid))?);
        let measurement = cache
            .measure_open_file(&mut exe)
            .map_err(not_measurable(pid))?
            // The file changed while it was read: what was hashed is no version of it.
            .ok_or(AttestationError::CallerChanged { pid })?;
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
        Ok(measurement)
    }
}

/// The measurement the quoting agent gives a process that runs the executable at `path`:
/// the SHA-256 of the whole file, streamed. The owner's release policy allows these.
pub fn measure_executable(path: &std::path::Path) -> io::Result<Measurement> {
    hash_file(&mut File::open(path)?)
}

/// SHA-256 of a whole file (ring uses the CPU's SHA extensions where it has them).
fn hash_file(file: &mut File) -> io::Result<Measurement> {
    let mut ctx = digest::Context::new(&digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        ctx.update(&buf[..n]);
    }
    let mut measurement = [0u8; 32];
    measurement.copy_from_slice(ctx.finish().as_ref());
    Ok(Measurement(measurement))
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
        let cache = MeasurementCache::default();
        assert_eq!(
            identity.measure(&cache).unwrap().0.as_slice(),
            expected.as_ref()
        );
        // The same measurement, taken from the file alone (what an owner allows).
        let from_file = measure_executable(&std::env::current_exe().unwrap()).unwrap();
        assert_eq!(from_file.0.as_slice(), expected.as_ref());
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
        let result = before.measure(&MeasurementCache::default());
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(
            matches!(result, Err(AttestationError::CallerChanged { pid: p }) if p == pid),
            "{result:?}"
        );
    }

    /// Runs `program` (with `args`) and waits until it has executed it.
    fn spawn_running(program: &std::path::Path, args: &[&str]) -> std::process::Child {
        // Another thread of the test harness may fork while the copy is open for writing,
        // which makes exec fail with ETXTBSY for a moment: retry.
        let mut attempts = 0;
        let child = loop {
            match std::process::Command::new(program).args(args).spawn() {
                Ok(child) => break child,
                Err(e) if e.raw_os_error() == Some(26) && attempts < 100 => {
                    attempts += 1;
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => panic!("spawning {}: {e}", program.display()),
            }
        };
        let pid = i32::try_from(child.id()).unwrap();
        let target = fs::canonicalize(program).unwrap();
        while fs::read_link(proc_path(pid, "exe")).ok().as_deref() != Some(target.as_path()) {
            std::thread::yield_now();
        }
        child
    }

    fn measure_child(child: &std::process::Child, cache: &MeasurementCache) -> Measurement {
        let pid = i32::try_from(child.id()).unwrap();
        CallerIdentity::of(pid).unwrap().measure(cache).unwrap()
    }

    /// A copy of `/bin/sleep` in a folder of its own, so that tests may change it.
    fn sleeper() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let program = dir.path().join("sleeper");
        fs::copy("/bin/sleep", &program).unwrap();
        (dir, program)
    }

    /// Appends one byte to `program` in place (same inode, new size, mtime and ctime).
    fn append_a_byte(program: &std::path::Path) {
        use std::io::Write;
        let mut file = fs::OpenOptions::new().append(true).open(program).unwrap();
        file.write_all(&[0]).unwrap();
    }

    #[test]
    fn a_prewarmed_executable_is_not_hashed_again_for_its_first_caller() {
        let (dir, program) = sleeper();
        let cache = MeasurementCache::default();
        let prewarmed = cache.prewarm(&program).unwrap();
        let expected = digest::digest(&digest::SHA256, &fs::read(&program).unwrap());
        assert_eq!(prewarmed.0.as_slice(), expected.as_ref());
        assert_eq!(cache.hashes(), 1);

        let mut child = spawn_running(&program, &["30"]);
        assert_eq!(measure_child(&child, &cache), prewarmed);
        assert_eq!(
            cache.hashes(),
            1,
            "the caller found the prewarmed measurement"
        );
        child.kill().unwrap();
        child.wait().unwrap();

        // A file changed after it was prewarmed is another identity: hashed on its quote.
        append_a_byte(&program);
        let mut changed = spawn_running(&program, &["30"]);
        assert_ne!(measure_child(&changed, &cache), prewarmed);
        assert_eq!(cache.hashes(), 2);
        changed.kill().unwrap();
        changed.wait().unwrap();

        assert!(cache.prewarm(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn the_same_executable_is_hashed_once_and_a_modified_copy_again() {
        let (_dir, program) = sleeper();
        let cache = MeasurementCache::default();

        let mut first = spawn_running(&program, &["30"]);
        let mut second = spawn_running(&program, &["30"]);
        let original = measure_child(&first, &cache);
        assert_eq!(measure_child(&second, &cache), original);
        assert_eq!(measure_child(&first, &cache), original);
        assert_eq!(
            cache.hashes(),
            1,
            "one executable, measured three times, hashed once"
        );
        let expected = digest::digest(&digest::SHA256, &fs::read(&program).unwrap());
        assert_eq!(original.0.as_slice(), expected.as_ref());
        for child in [&mut first, &mut second] {
            child.kill().unwrap();
            child.wait().unwrap();
        }

        // Modify the same file in place (same inode): one byte appended to the ELF.
        let inode = fs::metadata(&program).unwrap().ino();
        append_a_byte(&program);
        assert_eq!(fs::metadata(&program).unwrap().ino(), inode);
        let mut modified = spawn_running(&program, &["30"]);
        let changed = measure_child(&modified, &cache);
        modified.kill().unwrap();
        modified.wait().unwrap();
        assert_ne!(changed, original);
        let expected = digest::digest(&digest::SHA256, &fs::read(&program).unwrap());
        assert_eq!(changed.0.as_slice(), expected.as_ref());
        assert_eq!(cache.hashes(), 2);
    }

    #[test]
    fn an_in_place_rewrite_that_restores_size_and_mtime_is_hashed_again() {
        // Same size, mtime set back: only ctime tells the files apart.
        let (_dir, program) = sleeper();
        let cache = MeasurementCache::default();
        let mut child = spawn_running(&program, &["30"]);
        let original = measure_child(&child, &cache);
        child.kill().unwrap();
        child.wait().unwrap();

        let before = fs::metadata(&program).unwrap();
        let mut bytes = fs::read(&program).unwrap();
        // The last byte of an ELF file is section header data no loader reads at run time.
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01;
        {
            use std::io::{Seek, SeekFrom, Write};
            let mut file = fs::OpenOptions::new().write(true).open(&program).unwrap();
            file.seek(SeekFrom::Start(last as u64)).unwrap();
            file.write_all(&bytes[last..]).unwrap();
            file.set_modified(before.modified().unwrap()).unwrap();
        }
        let after = fs::metadata(&program).unwrap();
        assert_eq!(
            (after.size(), after.mtime(), after.mtime_nsec()),
            (before.size(), before.mtime(), before.mtime_nsec())
        );
        let mut child = spawn_running(&program, &["30"]);
        let rewritten = measure_child(&child, &cache);
        child.kill().unwrap();
        child.wait().unwrap();
        assert_ne!(rewritten, original);
        assert_eq!(cache.hashes(), 2);
    }
}
