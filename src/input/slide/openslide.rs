//! OpenSlide 4's C API, loaded at run time (`libloading`), so that tilefeat builds and runs on
//! tile folders where OpenSlide is absent; only opening a slide needs it.
//!
//! The library is looked for in `$TILEFEAT_OPENSLIDE` (the library file, or a folder holding
//! `libopenslide.so.1`), then in the `openslide-bin` wheel found at build time (`build.rs`
//! bakes its folder in as `TILEFEAT_OPENSLIDE_BIN_DIR`) or installed since beside the torch
//! tilefeat was built with, then by soname (`libopenslide.so.1`, the system's). PyPI's `openslide-bin` ships one self-contained `libopenslide.so.1`.
//!
//! A [`Handle`] is one `openslide_t`: OpenSlide makes its reads thread-safe, so the decode
//! workers share one. After any error a handle stays failed (every later call fails with the
//! same message): its owner opens a fresh one.

use std::ffi::{c_char, c_double, c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The soname OpenSlide 3.4 and 4.x are both known by.
const SONAME: &str = "libopenslide.so.1";

type OpenFn = unsafe extern "C" fn(*const c_char) -> *mut c_void;
type CloseFn = unsafe extern "C" fn(*mut c_void);
type GetErrorFn = unsafe extern "C" fn(*mut c_void) -> *const c_char;
type LevelCountFn = unsafe extern "C" fn(*mut c_void) -> i32;
type LevelDimsFn = unsafe extern "C" fn(*mut c_void, i32, *mut i64, *mut i64);
type LevelDownsampleFn = unsafe extern "C" fn(*mut c_void, i32) -> c_double;
type PropertyNamesFn = unsafe extern "C" fn(*mut c_void) -> *const *const c_char;
type PropertyValueFn = unsafe extern "C" fn(*mut c_void, *const c_char) -> *const c_char;
type ReadRegionFn = unsafe extern "C" fn(*mut c_void, *mut u32, i64, i64, i32, i64, i64);
type DetectVendorFn = unsafe extern "C" fn(*const c_char) -> *const c_char;
type VersionFn = unsafe extern "C" fn() -> *const c_char;
type CacheCreateFn = unsafe extern "C" fn(usize) -> *mut c_void;
type SetCacheFn = unsafe extern "C" fn(*mut c_void, *mut c_void);
type CacheReleaseFn = unsafe extern "C" fn(*mut c_void);

/// The loaded library and the entry points tilefeat calls.
pub struct Library {
    /// Where it was loaded from (for the provenance and messages).
    pub path: String,
    open: OpenFn,
    close: CloseFn,
    get_error: GetErrorFn,
    level_count: LevelCountFn,
    level_dimensions: LevelDimsFn,
    level_downsample: LevelDownsampleFn,
    property_names: PropertyNamesFn,
    property_value: PropertyValueFn,
    read_region: ReadRegionFn,
    detect_vendor: DetectVendorFn,
    version: VersionFn,
    /// OpenSlide 4's cache API (absent in 3.4: its default cache is used).
    cache: Option<(CacheCreateFn, SetCacheFn, CacheReleaseFn)>,
    /// Kept loaded for the life of the process (the function pointers above point into it).
    _lib: libloading::Library,
}

static LIBRARY: OnceLock<Result<Library, String>> = OnceLock::new();

/// The OpenSlide library, loaded on first use; the error says what was tried and the fix.
pub fn library() -> Result<&'static Library, String> {
    LIBRARY.get_or_init(load).as_ref().map_err(Clone::clone)
}

/// Where to look, in order: `$TILEFEAT_OPENSLIDE`, the build's openslide-bin, the soname.
fn candidates() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(p) = std::env::var_os("TILEFEAT_OPENSLIDE").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        out.push(if p.is_dir() { p.join(SONAME) } else { p });
    }
    if let Some(dir) = option_env!("TILEFEAT_OPENSLIDE_BIN_DIR").filter(|d| !d.is_empty()) {
        out.push(Path::new(dir).join(SONAME));
    }
    // Installed after the build, beside the torch tilefeat was built with (same venv).
    let beside_torch = Path::new(env!("TILEFEAT_LIBTORCH_LIB")).join("../../openslide_bin");
    if beside_torch.join(SONAME).exists() {
        out.push(beside_torch.join(SONAME));
    }
    out.push(PathBuf::from(SONAME));
    out
}

fn load() -> Result<Library, String> {
    let mut tried = Vec::new();
    let explicit = std::env::var_os("TILEFEAT_OPENSLIDE").is_some_and(|p| !p.is_empty());
    for (k, path) in candidates().into_iter().enumerate() {
        // SAFETY: loading OpenSlide runs its (and its bundled libraries') initialisers, which
        // have no preconditions.
        match unsafe { libloading::Library::new(&path) } {
            Ok(lib) => {
                return bind(lib, path.display().to_string())
                    .map_err(|e| format!("{}: {e}", path.display()))
            }
            Err(e) => {
                let e = e.to_string();
                // `$TILEFEAT_OPENSLIDE` names the one to use: do not fall back past it.
                if k == 0 && explicit {
                    return Err(format!(
                        "cannot load OpenSlide from TILEFEAT_OPENSLIDE={} ({e}): point it at \
                         libopenslide.so.1 (or unset it and pip install openslide-bin)",
                        path.display()
                    ));
                }
                tried.push(format!("{} ({e})", path.display()));
            }
        }
    }
    Err(format!(
        "OpenSlide (libopenslide.so.1) is not installed; tried {}. Install it with `pip install \
         openslide-bin` into tilefeat's venv (scripts/setup.sh does), or set \
         TILEFEAT_OPENSLIDE=/path/to/libopenslide.so.1",
        tried.join(", ")
    ))
}

/// `T` (a function pointer type) for the symbol `name` of `lib`.
///
/// SAFETY (of the lookup): every caller names an OpenSlide function with its documented C
/// signature (openslide.h, 3.4 and 4.x alike); the copied pointer stays valid as long as
/// `lib` is loaded, which is the life of the [`Library`] holding both (kept in a static).
fn sym<T: Copy>(lib: &libloading::Library, name: &str) -> Result<T, String> {
    // SAFETY: see above.
    unsafe { lib.get::<T>(name.as_bytes()) }
        .map(|s| *s)
        .map_err(|e| format!("not an OpenSlide library: no {name} ({e})"))
}

fn bind(lib: libloading::Library, path: String) -> Result<Library, String> {
    let cache = match (
        sym::<CacheCreateFn>(&lib, "openslide_cache_create"),
        sym::<SetCacheFn>(&lib, "openslide_set_cache"),
        sym::<CacheReleaseFn>(&lib, "openslide_cache_release"),
    ) {
        (Ok(a), Ok(b), Ok(c)) => Some((a, b, c)),
        _ => None,
    };
    Ok(Library {
        open: sym(&lib, "openslide_open")?,
        close: sym(&lib, "openslide_close")?,
        get_error: sym(&lib, "openslide_get_error")?,
        level_count: sym(&lib, "openslide_get_level_count")?,
        level_dimensions: sym(&lib, "openslide_get_level_dimensions")?,
        level_downsample: sym(&lib, "openslide_get_level_downsample")?,
        property_names: sym(&lib, "openslide_get_property_names")?,
        property_value: sym(&lib, "openslide_get_property_value")?,
        read_region: sym(&lib, "openslide_read_region")?,
        detect_vendor: sym(&lib, "openslide_detect_vendor")?,
        version: sym(&lib, "openslide_get_version")?,
        cache,
        path,
        _lib: lib,
    })
}

/// A C string OpenSlide owns, copied (None for NULL).
///
/// SAFETY: `p` is NULL or a NUL-terminated string valid for the duration of the call.
unsafe fn owned(p: *const c_char) -> Option<String> {
    (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

fn c_path(path: &Path) -> Result<CString, String> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(path.as_os_str().as_bytes()).map_err(|_| "its path holds a NUL byte".to_string())
}

impl Library {
    /// OpenSlide's version (`openslide_get_version`).
    pub fn version(&self) -> String {
        // SAFETY: returns a static string.
        unsafe { owned((self.version)()) }.unwrap_or_default()
    }

    /// The vendor OpenSlide takes `path` for, without opening it (None: not a slide it knows).
    pub fn detect_vendor(&self, path: &Path) -> Option<String> {
        let c = c_path(path).ok()?;
        // SAFETY: a valid C string in; a static string or NULL out.
        unsafe { owned((self.detect_vendor)(c.as_ptr())) }
    }

    /// Open `path`; the error is OpenSlide's reason (a file it does not recognise: "not a
    /// format OpenSlide recognises").
    pub fn open(&'static self, path: &Path) -> Result<Handle, String> {
        let c = c_path(path)?;
        // SAFETY: a valid C string in; a handle (possibly failed) or NULL out.
        let osr = unsafe { (self.open)(c.as_ptr()) };
        if osr.is_null() {
            return Err("not a format OpenSlide recognises".into());
        }
        let handle = Handle { lib: self, osr };
        if let Some(e) = handle.error() {
            return Err(e);
        }
        Ok(handle)
    }
}

/// An open slide (`openslide_t`), closed on drop.
pub struct Handle {
    lib: &'static Library,
    osr: *mut c_void,
}

// SAFETY: OpenSlide's handles are thread-safe ("openslide_t objects can be used from multiple
// threads"); closing happens once, in `drop`, when no other reference exists.
unsafe impl Send for Handle {}
unsafe impl Sync for Handle {}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: a handle from `openslide_open`, closed once.
        unsafe { (self.lib.close)(self.osr) }
    }
}

impl Handle {
    /// The handle's error, if it has failed (it then stays failed).
    pub fn error(&self) -> Option<String> {
        // SAFETY: a live handle; a string owned by it, copied at once.
        unsafe { owned((self.lib.get_error)(self.osr)) }
    }

    pub fn level_count(&self) -> i32 {
        // SAFETY: a live handle.
        unsafe { (self.lib.level_count)(self.osr) }
    }

    /// Width and height of `level` (-1, -1 on error).
    pub fn level_dimensions(&self, level: i32) -> (i64, i64) {
        let (mut w, mut h) = (-1i64, -1i64);
        // SAFETY: a live handle and two valid out-pointers.
        unsafe { (self.lib.level_dimensions)(self.osr, level, &mut w, &mut h) };
        (w, h)
    }

    pub fn level_downsample(&self, level: i32) -> f64 {
        // SAFETY: a live handle.
        unsafe { (self.lib.level_downsample)(self.osr, level) }
    }

    /// Every property, name and value.
    pub fn properties(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        // SAFETY: a live handle; a NULL-terminated array of strings owned by it, each copied.
        unsafe {
            let names = (self.lib.property_names)(self.osr);
            if names.is_null() {
                return out;
            }
            let mut k = 0;
            while !(*names.add(k)).is_null() {
                let name = *names.add(k);
                let value = owned((self.lib.property_value)(self.osr, name));
                if let (Some(n), Some(v)) = (owned(name), value) {
                    out.push((n, v));
                }
                k += 1;
            }
        }
        out
    }

    /// A region of `level`, `w` x `h` pixels from level-0 (`x`, `y`), as OpenSlide's
    /// premultiplied ARGB (native-endian u32 per pixel); the error is OpenSlide's (the handle
    /// has then failed).
    pub fn read_region(
        &self,
        x: i64,
        y: i64,
        level: i32,
        w: i64,
        h: i64,
    ) -> Result<Vec<u32>, String> {
        let n = usize::try_from(w * h).map_err(|_| format!("bad region size {w} x {h}"))?;
        let mut buf = vec![0u32; n];
        // SAFETY: a live handle and a buffer of w * h pixels, as read_region writes.
        unsafe { (self.lib.read_region)(self.osr, buf.as_mut_ptr(), x, y, level, w, h) };
        match self.error() {
            Some(e) => Err(e),
            None => Ok(buf),
        }
    }

    /// Give this handle a cache of `bytes` (OpenSlide 4; a no-op with 3.4). Tiles are decoded
    /// once per cache entry: the default 32 MiB is small for several decode workers.
    pub fn set_cache(&self, bytes: usize) {
        if let Some((create, set, release)) = self.lib.cache {
            // SAFETY: OpenSlide 4's cache API: the handle keeps its own reference, so releasing
            // ours at once frees the cache when the handle closes.
            unsafe {
                let cache = create(bytes);
                if !cache.is_null() {
                    set(self.osr, cache);
                    release(cache);
                }
            }
        }
    }
}
