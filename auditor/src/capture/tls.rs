//! Finds the TLS libraries processes use and hooks them: OpenSSL 1.1 and 3.x, as a shared
//! library (the system's, or a copy bundled in a language package) or linked statically
//! into an executable that keeps its symbols.
//!
//! A file is checked once, by (device, inode): uprobes attach to the file, so one attach
//! covers every process that maps it, now and later. Files are found at start-up (the
//! usual library directories and every mapped executable file of every process) and then
//! from the kernel's reports of new programs (exec) and newly mapped executable files.

use std::{
    collections::HashSet,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use object::{Object, ObjectSegment, ObjectSymbol};

/// The OpenSSL functions hooked, in the order they are hooked (the payload first: a
/// program already running gets its plaintext taken as early as possible), and which entry
/// program each gets. SSL_connect and SSL_accept call SSL_do_handshake.
pub const TLS_FUNCTIONS: &[(&str, &str)] = &[
    ("SSL_write", "ssl_write"),
    ("SSL_read", "ssl_read"),
    ("SSL_write_ex", "ssl_write_ex"),
    ("SSL_read_ex", "ssl_read_ex"),
    ("SSL_do_handshake", "ssl_other"),
    ("SSL_peek", "ssl_other"),
    ("SSL_peek_ex", "ssl_other"),
    ("SSL_shutdown", "ssl_other"),
];

/// Directories where a distribution keeps its shared libraries (and one level below them,
/// for multiarch directories such as /usr/lib/x86_64-linux-gnu).
const LIBRARY_DIRS: &[&str] = &["/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/local/lib"];

/// A file: the kernel's dev_t encoding (major << 20 | minor) and inode number.
pub type FileId = (u64, u64);

pub fn kernel_dev(major: u64, minor: u64) -> u64 {
    (major << 20) | minor
}

fn file_id_of(meta: &std::fs::Metadata) -> FileId {
    let dev = meta.dev();
    (
        kernel_dev(libc::major(dev) as u64, libc::minor(dev) as u64),
        meta.ino(),
    )
}

/// Where each hooked function starts, as offsets into the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSymbols {
    pub functions: Vec<(&'static str, u64)>,
}

/// A read-only mapping of a whole file (executables can be large; nothing is copied).
struct Mapped {
    ptr: *mut libc::c_void,
    len: usize,
}

impl Mapped {
    fn open(file: &std::fs::File) -> std::io::Result<Option<Mapped>> {
        use std::os::fd::AsRawFd;
        let len = file.metadata()?.len() as usize;
        if len == 0 {
            return Ok(None);
        }
        // SAFETY: a private read-only mapping of a file we opened; unmapped on drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Some(Mapped { ptr, len }))
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping is `len` bytes long and lives as long as `self`. (A file
        // truncated under us could fault; libraries and executables are not rewritten in
        // place by package managers, which replace them by rename.)
        unsafe { std::slice::from_raw_parts(self.ptr as *const u8, self.len) }
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: unmapping what `open` mapped.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

/// The hookable OpenSSL functions a file defines; None if it is not an ELF file with at
/// least SSL_read and SSL_write.
pub fn find_tls_symbols(path: &Path) -> std::io::Result<Option<TlsSymbols>> {
    find_tls_symbols_in(&std::fs::File::open(path)?)
}

/// File offsets (for uprobes) of the functions `names` defines, from its dynamic symbol
/// table or its full one; in the order of `names`. None when it is not an ELF file.
pub fn find_symbols_in(
    file: &std::fs::File,
    names: &[&'static str],
) -> std::io::Result<Option<Vec<(&'static str, u64)>>> {
    let Some(map) = Mapped::open(file)? else {
        return Ok(None);
    };
    let data = map.bytes();
    if data.len() < 4 || &data[..4] != b"\x7fELF" {
        return Ok(None);
    }
    let Ok(file) = object::File::parse(data) else {
        return Ok(None);
    };
    let mut found: Vec<(&'static str, u64)> = Vec::new();
    let symbols = file.dynamic_symbols().chain(file.symbols());
    for sym in symbols {
        if !sym.is_definition() || sym.address() == 0 {
            continue;
        }
        let Ok(name) = sym.name() else { continue };
        // Versioned names in .symtab look like SSL_read@@OPENSSL_3.0.0.
        let base = name.split('@').next().unwrap_or(name);
        let Some(&known) = names.iter().find(|f| **f == base) else {
            continue;
        };
        if found.iter().any(|(f, _)| *f == known) {
            continue;
        }
        let addr = sym.address();
        let offset = file.segments().find_map(|seg| {
            let (file_off, file_len) = seg.file_range();
            let start = seg.address();
            (addr >= start && addr < start + file_len).then(|| addr - start + file_off)
        });
        if let Some(offset) = offset {
            found.push((known, offset));
        }
    }
    found.sort_by_key(|(n, _)| names.iter().position(|f| f == n));
    Ok(Some(found))
}

/// The OpenSSL functions `file` defines, when it has at least SSL_read and SSL_write.
pub fn find_tls_symbols_in(file: &std::fs::File) -> std::io::Result<Option<TlsSymbols>> {
    let names: Vec<&'static str> = TLS_FUNCTIONS.iter().map(|(f, _)| *f).collect();
    let Some(found) = find_symbols_in(file, &names)? else {
        return Ok(None);
    };
    let has = |f: &str| found.iter().any(|(n, _)| *n == f);
    if has("SSL_read") && has("SSL_write") {
        Ok(Some(TlsSymbols { functions: found }))
    } else {
        Ok(None)
    }
}

/// One line of /proc/PID/maps that maps a file with execute permission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecMapping {
    pub range: String,
    pub id: FileId,
    pub path: String,
}

pub fn parse_maps(text: &str) -> Vec<ExecMapping> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut f = line.splitn(6, ' ');
        let (Some(range), Some(perms), Some(_off), Some(dev), Some(ino)) =
            (f.next(), f.next(), f.next(), f.next(), f.next())
        else {
            continue;
        };
        let path = f.next().unwrap_or("").trim_start();
        if !perms.contains('x') || !path.starts_with('/') || path.ends_with(" (deleted)") {
            continue;
        }
        let Ok(ino) = ino.parse::<u64>() else {
            continue;
        };
        if ino == 0 {
            continue;
        }
        let Some((maj, min)) = dev.split_once(':') else {
            continue;
        };
        let (Ok(maj), Ok(min)) = (u64::from_str_radix(maj, 16), u64::from_str_radix(min, 16))
        else {
            continue;
        };
        out.push(ExecMapping {
            range: range.to_string(),
            id: (kernel_dev(maj, min), ino),
            path: path.to_string(),
        });
    }
    out
}

/// A hooked file.
#[derive(Debug, Clone)]
pub struct TlsLibrary {
    pub path: String,
    pub id: FileId,
    pub functions: usize,
}

#[derive(Debug, Default, Clone, Copy, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct TlsCounters {
    /// Distinct files examined for TLS functions.
    pub files_checked: u64,
    /// Files hooked.
    pub libraries_hooked: u64,
    /// Files with TLS functions that could not be hooked.
    pub hook_failures: u64,
}

/// A file to look at, and where it can be opened: paths tried in order, the first whose
/// inode matches is used.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub id: FileId,
    pub open_paths: Vec<PathBuf>,
    pub shown: String,
}

#[derive(Default)]
pub struct TlsFinder {
    checked: HashSet<FileId>,
    pub libraries: Vec<TlsLibrary>,
    pub counters: TlsCounters,
}

impl TlsFinder {
    pub fn is_checked(&self, id: &FileId) -> bool {
        self.checked.contains(id)
    }

    /// Marks a file as examined; false if it already was.
    pub fn mark(&mut self, id: FileId) -> bool {
        self.checked.insert(id)
    }

    pub fn counted_check(&mut self) {
        self.counters.files_checked += 1;
    }
}

/// Libraries named libssl* in the usual directories (hooked even before any process maps
/// them, so programs started later are covered from their first call).
pub fn library_dir_candidates() -> Vec<Candidate> {
    let mut out = Vec::new();
    let mut dirs: Vec<PathBuf> = Vec::new();
    for d in LIBRARY_DIRS {
        let d = PathBuf::from(d);
        if let Ok(rd) = std::fs::read_dir(&d) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    dirs.push(e.path());
                }
            }
        }
        dirs.push(d);
    }
    for d in dirs {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if !name.starts_with("libssl.so") {
                continue;
            }
            let path = e.path();
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            if !meta.is_file() {
                continue;
            }
            let real = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
            out.push(Candidate {
                id: file_id_of(&meta),
                shown: real.display().to_string(),
                open_paths: vec![path],
            });
        }
    }
    out
}

/// The executable of a process.
pub fn exe_candidate(pid: u32) -> Option<Candidate> {
    let exe = PathBuf::from(format!("/proc/{pid}/exe"));
    let meta = std::fs::metadata(&exe).ok()?;
    let shown = std::fs::read_link(&exe)
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| exe.display().to_string());
    let root_path = PathBuf::from(format!("/proc/{pid}/root")).join(shown.trim_start_matches('/'));
    Some(Candidate {
        id: file_id_of(&meta),
        open_paths: vec![exe, root_path, PathBuf::from(&shown)],
        shown,
    })
}

/// Every executable file a process maps; with `only`, just that file.
pub fn mapped_candidates(pid: u32, only: Option<FileId>) -> Vec<Candidate> {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else {
        return Vec::new();
    };
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for m in parse_maps(&text) {
        // The kernel reports the inode it mapped; the device it names can differ from what
        // maps prints on stacked filesystems, so the inode decides when asked for one file.
        if let Some((_, ino)) = only {
            if m.id.1 != ino {
                continue;
            }
        }
        if !seen.insert(m.id) {
            continue;
        }
        out.push(Candidate {
            id: only.unwrap_or(m.id),
            // The process's own view first; the path in this namespace if it is gone.
            open_paths: vec![
                PathBuf::from(format!("/proc/{pid}/map_files/{}", m.range)),
                PathBuf::from(format!("/proc/{pid}/root")).join(m.path.trim_start_matches('/')),
                PathBuf::from(&m.path),
            ],
            shown: m.path,
        });
    }
    out
}

/// Every process's executable and mapped executable files, for the start-up scan.
pub fn running_candidates() -> Vec<Candidate> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    let own = std::process::id();
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == own {
            continue;
        }
        if let Some(c) = exe_candidate(pid) {
            out.push(c);
        }
        out.extend(mapped_candidates(pid, None));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_lines() {
        let text = "\
55d0c0a00000-55d0c0a28000 r--p 00000000 fd:01 1311 /usr/bin/psql
55d0c0a28000-55d0c0a80000 r-xp 00028000 fd:01 1311 /usr/bin/psql
7f1e2c000000-7f1e2c021000 rw-p 00000000 00:00 0 
7f1e2d000000-7f1e2d080000 r-xp 00020000 08:02 777 /usr/lib/x86_64-linux-gnu/libssl.so.3
7f1e2e000000-7f1e2e080000 r-xp 00020000 08:02 778 /tmp/x/libssl.so.3 (deleted)
7ffd1a000000-7ffd1a002000 r-xp 00000000 00:00 0                          [vdso]
garbage line
";
        let m = parse_maps(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].path, "/usr/bin/psql");
        assert_eq!(m[0].id, (kernel_dev(0xfd, 1), 1311));
        assert_eq!(m[1].path, "/usr/lib/x86_64-linux-gnu/libssl.so.3");
        assert_eq!(m[1].range, "7f1e2d000000-7f1e2d080000");
    }

    #[test]
    fn non_elf_and_missing_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("not-elf");
        std::fs::write(&p, b"#!/bin/sh\necho hi\n").unwrap();
        assert_eq!(find_tls_symbols(&p).unwrap(), None);
        let empty = dir.path().join("empty");
        std::fs::write(&empty, b"").unwrap();
        assert_eq!(find_tls_symbols(&empty).unwrap(), None);
        let bad = dir.path().join("bad-elf");
        std::fs::write(&bad, b"\x7fELF\x02\x01\x01garbage").unwrap();
        assert_eq!(find_tls_symbols(&bad).unwrap(), None);
        assert!(find_tls_symbols(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn system_libssl_has_its_functions() {
        let libs = library_dir_candidates();
        let Some(lib) = libs.iter().find(|c| c.shown.contains("libssl.so.3")) else {
            eprintln!("skipped: no libssl.so.3 on this machine");
            return;
        };
        let syms = find_tls_symbols(&lib.open_paths[0])
            .unwrap()
            .expect("libssl defines SSL_read and SSL_write");
        let names: Vec<&str> = syms.functions.iter().map(|(n, _)| *n).collect();
        for f in [
            "SSL_read",
            "SSL_write",
            "SSL_read_ex",
            "SSL_write_ex",
            "SSL_do_handshake",
        ] {
            assert!(names.contains(&f), "{f} missing from {names:?}");
        }
        assert!(syms.functions.iter().all(|(_, off)| *off > 0));
        // Not a TLS library.
        assert_eq!(find_tls_symbols(Path::new("/bin/sh")).unwrap(), None);
    }
}
