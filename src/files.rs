//! Reading and writing files without hanging or losing data.
//!
//! - Inputs must be regular files: a FIFO or a device would block a read
//!   forever, a directory gives a confusing OS error ([`open_regular`]).
//! - Outputs are written to a temporary file in the target folder and renamed
//!   into place only once complete, so a failed write never leaves a
//!   truncated file. On Linux that file is an `O_TMPFILE`, named only when
//!   complete, so a killed command leaves nothing either. An output that is
//!   the same file as an input (compared by device and inode, so `./x`,
//!   `$PWD/x`, symlinks and hard links are caught) is refused before
//!   anything is written ([`write_atomic`]).

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_path_buf(), error: source }
}

/// What `path` is, for an error: "a directory", "a FIFO", ...
fn kind_of(meta: &std::fs::Metadata) -> &'static str {
    let t = meta.file_type();
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "a FIFO";
        }
        if t.is_socket() {
            return "a socket";
        }
        if t.is_char_device() || t.is_block_device() {
            return "a device";
        }
    }
    if t.is_dir() {
        "a directory"
    } else {
        "not a regular file"
    }
}

/// Checks that `path` (symlinks followed) is a regular file, without opening it.
pub fn check_regular(path: &Path) -> Result<std::fs::Metadata> {
    let meta = std::fs::metadata(path).map_err(io(path))?;
    if !meta.is_file() {
        return Err(Error::NotAFile { path: path.to_path_buf(), kind: kind_of(&meta) });
    }
    Ok(meta)
}

/// Opens `path` for reading if it is a regular file. The check is made on the
/// opened file too (non-blocking open), so a FIFO swapped in between cannot
/// block the open or the reads.
pub fn open_regular(path: &Path) -> Result<File> {
    check_regular(path)?;
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // O_NONBLOCK: opening a FIFO does not wait for a writer.
        opts.custom_flags(0o4000);
    }
    let file = opts.open(path).map_err(io(path))?;
    let meta = file.metadata().map_err(io(path))?;
    if !meta.is_file() {
        return Err(Error::NotAFile { path: path.to_path_buf(), kind: kind_of(&meta) });
    }
    Ok(file)
}

/// Reads a whole regular file.
pub fn read_regular(path: &Path) -> Result<Vec<u8>> {
    let mut f = open_regular(path)?;
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut f, &mut out).map_err(io(path))?;
    Ok(out)
}

/// Whether `a` and `b` name the same file (device and inode); false when
/// either does not exist.
pub fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        #[cfg(unix)]
        (Ok(x), Ok(y)) => {
            use std::os::unix::fs::MetadataExt;
            x.dev() == y.dev() && x.ino() == y.ino()
        }
        #[cfg(not(unix))]
        (Ok(_), Ok(_)) => match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
            (Ok(x), Ok(y)) => x == y,
            _ => false,
        },
        _ => false,
    }
}

/// Whether an existing output may be replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overwrite {
    /// An existing output is an error ([`Error::OutputExists`]).
    Refuse,
    /// An existing output is replaced (atomically).
    Replace,
}

/// Writes `out` atomically: `write` writes the whole content to the path it
/// is given, a new temporary file in `out`'s folder (on Linux an unnamed
/// `O_TMPFILE` reached through `/proc/self/fd`), which is synced and renamed
/// over `out` only when `write` succeeded; on any error the temporary file
/// is removed and `out` is untouched. `out` must not be the same file as
/// any of `inputs`.
pub fn write_atomic(
    out: &Path,
    inputs: &[&Path],
    overwrite: Overwrite,
    write: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    if let Some(input) = inputs.iter().find(|i| same_file(out, i)) {
        return Err(Error::SameFile { output: out.to_path_buf(), input: input.to_path_buf() });
    }
    if let Ok(meta) = std::fs::metadata(out) {
        if !meta.is_file() {
            return Err(Error::NotAFile { path: out.to_path_buf(), kind: kind_of(&meta) });
        }
        if overwrite == Overwrite::Refuse {
            return Err(Error::OutputExists { path: out.to_path_buf() });
        }
    }
    let tmp = temp_beside(out)?;
    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    if let Some(unnamed) = UnnamedOutput::open(&tmp) {
        return unnamed.write(out, &tmp, write);
    }
    let result = (|| {
        // Created here, new, so no other file is ever written through `tmp`.
        std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp).map_err(io(&tmp))?;
        write(&tmp)?;
        File::open(&tmp).and_then(|f| f.sync_all()).map_err(io(&tmp))?;
        std::fs::rename(&tmp, out).map_err(io(out))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// An output being written as an `O_TMPFILE` in its folder (Linux): it has
/// no name until it is complete, so nothing is left behind however the
/// process ends (killed, out of memory, Ctrl-C) while it is written. The
/// writer reaches it through `/proc/self/fd/N`; once written and synced it
/// is linked to the temporary name and renamed over the output, a window of
/// two system calls.
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
struct UnnamedOutput {
    file: File,
    proc_path: PathBuf,
}

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
impl UnnamedOutput {
    /// `None` where the folder's file system has no `O_TMPFILE` or `/proc`
    /// is not mounted (the caller then writes to the named temporary file).
    fn open(tmp: &Path) -> Option<Self> {
        use std::os::fd::AsRawFd;
        let file = unnamed_tmpfile(tmp.parent()?, 0o666)?;
        let proc_path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
        proc_path.exists().then_some(Self { file, proc_path })
    }

    fn write(self, out: &Path, tmp: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
        use std::os::unix::ffi::OsStrExt;
        write(&self.proc_path)?;
        self.file.sync_all().map_err(io(out))?;
        let c = |p: &Path| {
            std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(|e| Error::Io {
                path: p.to_path_buf(),
                error: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
            })
        };
        let (from, to) = (c(&self.proc_path)?, c(tmp)?);
        // SAFETY: two NUL-terminated paths that outlive the call.
        let rc = unsafe {
            libc::linkat(libc::AT_FDCWD, from.as_ptr(), libc::AT_FDCWD, to.as_ptr(), libc::AT_SYMLINK_FOLLOW)
        };
        if rc != 0 {
            return Err(Error::Io { path: tmp.to_path_buf(), error: std::io::Error::last_os_error() });
        }
        std::fs::rename(tmp, out).map_err(io(out)).inspect_err(|_| {
            let _ = std::fs::remove_file(tmp);
        })
    }
}

/// An `O_TMPFILE` in `dir` with `mode` (less the umask), or `None` where its
/// file system has none.
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
fn unnamed_tmpfile(dir: &Path, mode: u32) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    // O_TMPFILE: __O_TMPFILE | O_DIRECTORY (x86-64 values).
    const O_TMPFILE: i32 = 0o20_000_000 | 0o200_000;
    std::fs::OpenOptions::new().read(true).write(true).mode(mode).custom_flags(O_TMPFILE).open(dir).ok()
}

/// A name for a temporary file in `out`'s folder (so the rename stays on one
/// file system): `.NAME.PID.N.tmp`.
fn temp_beside(out: &Path) -> Result<PathBuf> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let name = out
        .file_name()
        .ok_or_else(|| Error::InvalidArgument(format!("{}: not a file name to write", out.display())))?;
    let dir = out.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let n = N.fetch_add(1, Ordering::Relaxed);
    Ok(dir.join(format!(".{}.{}.{n}.tmp", name.to_string_lossy(), std::process::id())))
}

/// A new file in `dir` that has no name: on Linux an `O_TMPFILE`, elsewhere
/// (or where the file system lacks it) a file created and unlinked at once.
/// Whatever ends the process, nothing is left in `dir`; the file is gone
/// when its last handle (or mapping) is.
pub fn unnamed_file(dir: &Path) -> Result<File> {
    // O_TMPFILE's value differs by architecture (O_DIRECTORY does): x86-64 only.
    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    if let Some(f) = unnamed_tmpfile(dir, 0o600) {
        return Ok(f);
    }
    let path = temp_beside(&dir.join("unnamed"))?;
    let f = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(&path).map_err(io(&path))?;
    std::fs::remove_file(&path).map_err(io(&path))?;
    Ok(f)
}
