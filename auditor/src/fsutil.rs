//! Files of the state directory: private to the daemon's user, written whole or not at all.
//!
//! The trail is not for every account on the host to read (it names every session's
//! statements, users and workloads): directories are created 0700 and files 0600, and a
//! directory an older version created more open is closed when the daemon opens it.

use std::{
    io::Write,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    path::Path,
};

/// Creates `dir` (and missing parents) with mode 0700, and makes an existing `dir` 0700.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let mode = std::fs::metadata(dir)?.permissions().mode() & 0o777;
    if mode != 0o700 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Options for a file only its owner reads: mode 0600 when it is created.
pub fn private_options() -> std::fs::OpenOptions {
    let mut o = std::fs::OpenOptions::new();
    o.mode(0o600);
    o
}

/// Makes an existing file 0600 (one an older version created 0644).
pub fn make_private(path: &Path) -> std::io::Result<()> {
    let mode = std::fs::metadata(path)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o700))?;
    }
    Ok(())
}

/// Writes `bytes` to `path` whole or not at all (a 0600 temporary file beside it, renamed
/// over it): a reader sees the old content or the new, never half of either.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = tmp_of(path);
    let mut f = private_options()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&tmp)?;
    f.write_all(bytes)?;
    drop(f);
    std::fs::rename(&tmp, path)
}

/// The temporary file beside `path`.
fn tmp_of(path: &Path) -> std::path::PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Writes `bytes` to `path` whole or not at all, as [`write_private`] does, for a small
/// file rewritten every second or so (the stats, the trail's watermark): the temporary
/// file beside it is written over and exchanged with it (one atomic `renameat2`), so the
/// old content stays there for the next write. A new temporary file renamed over the old
/// one each time costs ext4, on the writing thread, an inode made and one freed, a forced
/// write-back of the new data and a discard of the old blocks: a few percent of the
/// decoding thread's time, in a profile under load.
///
/// No write-back is forced: after a crash of the host the file may hold the content of
/// an earlier write (whole, for a file of one block). Only for files where an older content is
/// safe to read (an older watermark makes a larger gap, never a smaller one).
pub fn rewrite_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = tmp_of(path);
    let mut f = private_options().create(true).write(true).open(&tmp)?;
    // The exchanged file may be one an older version created 0644.
    make_private(&tmp)?;
    f.write_all(bytes)?;
    f.set_len(bytes.len() as u64)?;
    drop(f);
    match exchange(&tmp, path) {
        Ok(()) => Ok(()),
        // Nothing to exchange with yet, or a file system (or kernel) without exchanges.
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOENT | libc::EINVAL | libc::ENOSYS)
            ) =>
        {
            std::fs::rename(&tmp, path)
        }
        Err(e) => Err(e),
    }
}

/// Swaps the files at `a` and `b` (`RENAME_EXCHANGE`): each name is always a whole file.
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let a = std::ffi::CString::new(a.as_os_str().as_bytes())?;
    let b = std::ffi::CString::new(b.as_os_str().as_bytes())?;
    // SAFETY: two NUL-terminated paths that live across the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directories_and_files_are_private() {
        let tmp = tempfile::tempdir().unwrap();
        let open = tmp.path().join("state");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&open.join("log")).unwrap();
        private_dir(&open).unwrap();
        for d in [&open, &open.join("log")] {
            let mode = std::fs::metadata(d).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "{}", d.display());
        }
        let f = open.join("stats.json");
        write_private(&f, b"{}").unwrap();
        assert_eq!(
            std::fs::metadata(&f).unwrap().permissions().mode() & 0o777,
            0o600
        );
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        make_private(&f).unwrap();
        assert_eq!(
            std::fs::metadata(&f).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(std::fs::read(&f).unwrap(), b"{}");
    }

    #[test]
    fn rewritten_files_are_whole_and_private() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("stats.json");
        // The first write has nothing to exchange with.
        rewrite_private(&f, b"first, the longest content").unwrap();
        assert_eq!(std::fs::read(&f).unwrap(), b"first, the longest content");
        let ino = |p: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
        let before = ino(&f);
        // A shorter content leaves nothing of the longer one; the two files take turns.
        rewrite_private(&f, b"second").unwrap();
        assert_eq!(std::fs::read(&f).unwrap(), b"second");
        assert_eq!(
            std::fs::read(tmp_of(&f)).unwrap(),
            b"first, the longest content"
        );
        assert_ne!(ino(&f), before);
        rewrite_private(&f, b"third").unwrap();
        assert_eq!(std::fs::read(&f).unwrap(), b"third");
        assert_eq!(ino(&f), before, "the first file, written over");
        // A file an older version made readable by all is made private.
        std::fs::set_permissions(tmp_of(&f), std::fs::Permissions::from_mode(0o644)).unwrap();
        rewrite_private(&f, b"fourth").unwrap();
        assert_eq!(std::fs::read(&f).unwrap(), b"fourth");
        for p in [f.clone(), tmp_of(&f)] {
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", p.display());
        }
        // And a replaced file (write_private) is rewritten as well.
        write_private(&f, b"fifth").unwrap();
        rewrite_private(&f, b"sixth").unwrap();
        assert_eq!(std::fs::read(&f).unwrap(), b"sixth");
    }
}
