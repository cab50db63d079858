//! Hugging Face model directories: `config.json` + `*.safetensors`
//! (single file or sharded with `model.safetensors.index.json`), memory-mapped.
//!
//! Everything that can be checked is checked at [`HfDir::open`]: every file's
//! header, that each tensor's bytes lie inside its file (a truncated download
//! is an error here, not a crash in a kernel later), that every tensor has a
//! dtype the engine can read, and that the index and the shards agree. After
//! that, [`HfDir::tensor`] is a map lookup that borrows from the memory map.
//!
//! Which files are read, in order of preference:
//! 1. `model.safetensors.index.json` present: exactly the files its
//!    `weight_map` names (they must exist, sit in the same directory, and hold
//!    the tensors the index says they hold);
//! 2. else `model.safetensors`;
//! 3. else every `*.safetensors` file in the directory (sorted by name), which
//!    covers shards whose index was not copied. A tensor found twice is an error.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};

use safetensors::{Dtype, SafeTensorError, SafeTensors};

use crate::error::{ModelError, Result};
use crate::quant::GgmlType;

/// Name of the index file of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// Name of a single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";

/// One tensor in a safetensors file, borrowed from its memory map.
pub struct HfTensor<'a> {
    /// F32, F16 or BF16.
    pub ty: GgmlType,
    /// Row-major shape as stored.
    pub shape: &'a [usize],
    pub bytes: &'a [u8],
}

/// One memory-mapped `.safetensors` file.
struct Shard {
    path: PathBuf,
    /// Kept alive for the borrows handed out by [`HfDir::tensor`].
    mmap: memmap2::Mmap,
}

/// Where one tensor lives. Offsets are absolute within the shard's map (the
/// 8-byte length prefix and the JSON header already added), so a lookup is
/// a plain slice.
struct Entry {
    shard: usize,
    ty: GgmlType,
    /// Owned here so that [`HfTensor::shape`] can borrow it.
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

pub struct HfDir {
    pub dir: PathBuf,
    /// The parsed `config.json`.
    pub config: serde_json::Value,
    shards: Vec<Shard>,
    tensors: BTreeMap<String, Entry>,
}

impl std::fmt::Debug for HfDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfDir")
            .field("dir", &self.dir)
            .field(
                "files",
                &self.shards.iter().map(|s| &s.path).collect::<Vec<_>>(),
            )
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

fn io_err(path: &Path, source: std::io::Error) -> ModelError {
    ModelError::Io {
        path: path.to_path_buf(),
        cause: source,
    }
}

fn st_err(path: &Path, reason: impl Into<String>) -> ModelError {
    ModelError::Safetensors {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// The element types the engine reads from safetensors; anything else is an
/// error that names the tensor, so a quantised or integer checkpoint fails
/// at open with a message rather than producing garbage.
pub(crate) fn dtype_to_ggml(dtype: Dtype, name: &str, path: &Path) -> Result<GgmlType> {
    match dtype {
        Dtype::F32 => Ok(GgmlType::F32),
        Dtype::F16 => Ok(GgmlType::F16),
        Dtype::BF16 => Ok(GgmlType::BF16),
        other => Err(ModelError::UnsupportedType(format!(
            "{other} (tensor '{name}' in {})",
            path.display()
        ))),
    }
}

impl HfDir {
    /// Opens a Hugging Face directory: parses `config.json`, maps and
    /// validates every safetensors file it needs (see the module docs).
    pub fn open(dir: &Path) -> Result<Self> {
        let config_path = dir.join("config.json");
        let config_text = match std::fs::read_to_string(&config_path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ModelError::Config(format!(
                    "{} has no config.json: a Hugging Face model directory needs config.json next to its *.safetensors files",
                    dir.display()
                )))
            }
            Err(e) => return Err(io_err(&config_path, e)),
        };
        let config: serde_json::Value = serde_json::from_str(&config_text).map_err(|e| {
            ModelError::Config(format!("{}: invalid JSON: {e}", config_path.display()))
        })?;
        if !config.is_object() {
            return Err(ModelError::Config(format!(
                "{}: expected a JSON object",
                config_path.display()
            )));
        }

        let index_path = dir.join(INDEX_FILE);
        let single = dir.join(SINGLE_FILE);
        let (files, weight_map) = if index_path.is_file() {
            let (files, map) = read_index(dir, &index_path)?;
            (files, Some(map))
        } else if single.is_file() {
            (vec![SINGLE_FILE.to_string()], None)
        } else {
            let mut files = Vec::new();
            let rd = std::fs::read_dir(dir).map_err(|e| io_err(dir, e))?;
            for entry in rd {
                let entry = entry.map_err(|e| io_err(dir, e))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.ends_with(".safetensors") && entry.path().is_file() {
                    files.push(name);
                }
            }
            files.sort();
            if files.is_empty() {
                return Err(st_err(
                    dir,
                    format!("no {SINGLE_FILE}, {INDEX_FILE} or other *.safetensors file in this directory"),
                ));
            }
            (files, None)
        };

        let mut shards = Vec::with_capacity(files.len());
        let mut tensors: BTreeMap<String, Entry> = BTreeMap::new();
        for file in &files {
            let path = dir.join(file);
            let shard_idx = shards.len();
            let (mmap, entries) = map_file(&path)?;
            for (name, mut entry) in entries {
                entry.shard = shard_idx;
                if let Some(map) = &weight_map {
                    match map.get(&name) {
                        Some(f) if f != file => {
                            return Err(st_err(
                                &index_path,
                                format!("tensor '{name}' is indexed in {f} but found in {file}"),
                            ))
                        }
                        // Tensors the index does not list are still served:
                        // the file is authoritative for what it holds.
                        _ => {}
                    }
                }
                if let Some(prev) = tensors.get(&name) {
                    return Err(st_err(
                        &path,
                        format!(
                            "tensor '{name}' also appears in {}",
                            shards
                                .get(prev.shard)
                                .map(|s: &Shard| s.path.display().to_string())
                                .unwrap_or_default()
                        ),
                    ));
                }
                tensors.insert(name, entry);
            }
            shards.push(Shard { path, mmap });
        }
        if let Some(map) = &weight_map {
            for (name, file) in map {
                if !tensors.contains_key(name) {
                    return Err(st_err(
                        &dir.join(file),
                        format!("{INDEX_FILE} lists tensor '{name}' in this file but the file does not contain it"),
                    ));
                }
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            shards,
            tensors,
        })
    }

    /// Tensor by its Hugging Face name (`model.layers.0.self_attn.q_proj.weight`).
    pub fn tensor(&self, name: &str) -> Option<HfTensor<'_>> {
        let e = self.tensors.get(name)?;
        let shard = self.shards.get(e.shard)?;
        Some(HfTensor {
            ty: e.ty,
            shape: &e.shape,
            // In range: checked against the file length at open.
            bytes: shard.mmap.get(e.start..e.end)?,
        })
    }

    /// Every tensor name, sorted.
    pub fn tensor_names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }

    /// The safetensors files this directory was read from, in load order.
    pub fn files(&self) -> Vec<&Path> {
        self.shards.iter().map(|s| s.path.as_path()).collect()
    }
}

/// Reads `model.safetensors.index.json`: the distinct shard files (in order
/// of first appearance) and the tensor → file map. Shard names must be plain
/// file names in the same directory, and the files must exist.
fn read_index(dir: &Path, index_path: &Path) -> Result<(Vec<String>, BTreeMap<String, String>)> {
    let text = std::fs::read_to_string(index_path).map_err(|e| io_err(index_path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| st_err(index_path, format!("invalid JSON: {e}")))?;
    let wm = v
        .get("weight_map")
        .and_then(|w| w.as_object())
        .ok_or_else(|| st_err(index_path, "no 'weight_map' object"))?;
    let mut files: Vec<String> = Vec::new();
    let mut seen = BTreeSet::new();
    let mut map = BTreeMap::new();
    for (name, file) in wm {
        let file = file
            .as_str()
            .ok_or_else(|| st_err(index_path, format!("weight_map['{name}'] is not a string")))?;
        let mut comps = Path::new(file).components();
        let plain = matches!(comps.next(), Some(Component::Normal(_))) && comps.next().is_none();
        if !plain {
            return Err(st_err(
                index_path,
                format!("weight_map['{name}'] = '{file}' is not a file name in this directory"),
            ));
        }
        if seen.insert(file.to_string()) {
            let path = dir.join(file);
            if !path.is_file() {
                return Err(st_err(
                    index_path,
                    format!(
                        "shard '{file}' (holding '{name}') does not exist in {}",
                        dir.display()
                    ),
                ));
            }
            files.push(file.to_string());
        }
        map.insert(name.clone(), file.to_string());
    }
    if files.is_empty() {
        return Err(st_err(index_path, "'weight_map' is empty"));
    }
    Ok((files, map))
}

/// Maps one safetensors file and validates its header. Returned entries have
/// `shard` = 0; the caller fills it in.
fn map_file(path: &Path) -> Result<(memmap2::Mmap, Vec<(String, Entry)>)> {
    let file = std::fs::File::open(path).map_err(|e| io_err(path, e))?;
    let len = file.metadata().map_err(|e| io_err(path, e))?.len();
    if len < 8 {
        return Err(ModelError::Truncated {
            path: path.to_path_buf(),
            reason: format!("{len} bytes, shorter than the 8-byte header length"),
        });
    }
    // SAFETY: the map is read-only and kept alive as long as the borrows; as
    // with every memory-mapped model reader, the file must not be modified
    // while it is open.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| io_err(path, e))?;
    let (header_len, meta) = match SafeTensors::read_metadata(&mmap) {
        Ok(x) => x,
        Err(e) => return Err(header_error(path, &mmap, e)),
    };
    let data_start = 8 + header_len;
    let mut entries = Vec::new();
    for (name, info) in meta.tensors() {
        let ty = dtype_to_ggml(info.dtype, &name, path)?;
        let (s, e) = info.data_offsets;
        // read_metadata has checked that the offsets tile the data section
        // exactly and that the file ends where the last tensor does.
        entries.push((
            name,
            Entry {
                shard: 0,
                ty,
                shape: info.shape.clone(),
                start: data_start + s,
                end: data_start + e,
            },
        ));
    }
    Ok((mmap, entries))
}

/// Turns a header error into a message that says what is wrong, telling a
/// truncated file apart from a malformed one.
fn header_error(path: &Path, buf: &[u8], e: SafeTensorError) -> ModelError {
    let n = u64::from_le_bytes(buf[..8].try_into().unwrap_or([0; 8]));
    let len = buf.len() as u64;
    match e {
        SafeTensorError::InvalidHeaderLength if n.saturating_add(8) > len => {
            ModelError::Truncated {
                path: path.to_path_buf(),
                reason: format!("header declares {n} bytes but the file has only {len}"),
            }
        }
        SafeTensorError::MetadataIncompleteBuffer => {
            // Find how long the data section should be, for the message.
            let expected = std::str::from_utf8(&buf[8..8 + n as usize])
                .ok()
                .and_then(|s| serde_json::from_str::<serde_json::Value>(s).ok())
                .and_then(|v| {
                    v.as_object().map(|o| {
                        o.values()
                            .filter_map(|t| t.get("data_offsets")?.get(1)?.as_u64())
                            .max()
                            .unwrap_or(0)
                    })
                });
            let have = len - 8 - n;
            match expected {
                Some(exp) if have < exp => ModelError::Truncated {
                    path: path.to_path_buf(),
                    reason: format!("tensor data needs {exp} bytes but the file holds {have}"),
                },
                Some(exp) => st_err(
                    path,
                    format!("{} bytes after the last tensor's data", have - exp),
                ),
                None => st_err(path, "file size does not match its header"),
            }
        }
        other => st_err(path, format!("invalid header: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes a safetensors file with the given (name, dtype, shape, bytes).
    fn write_st(path: &Path, tensors: &[(&str, &str, Vec<usize>, Vec<u8>)]) {
        let mut header = serde_json::Map::new();
        let mut off = 0usize;
        let mut data = Vec::new();
        for (name, dtype, shape, bytes) in tensors {
            header.insert(
                name.to_string(),
                serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [off, off + bytes.len()]}),
            );
            off += bytes.len();
            data.extend_from_slice(bytes);
        }
        let mut h = serde_json::to_vec(&serde_json::Value::Object(header)).unwrap();
        while !h.len().is_multiple_of(8) {
            h.push(b' ');
        }
        let mut out = (h.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&h);
        out.extend_from_slice(&data);
        std::fs::write(path, out).unwrap();
    }

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn config(dir: &Path) {
        std::fs::write(dir.join("config.json"), r#"{"model_type":"llama"}"#).unwrap();
    }

    #[test]
    fn single_file_all_float_types() {
        let tmp = tempfile::tempdir().unwrap();
        config(tmp.path());
        let bf: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
            .collect();
        let f16: Vec<u8> = [0.25f32, 3.0, 4.0]
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect();
        write_st(
            &tmp.path().join(SINGLE_FILE),
            &[
                ("a", "F32", vec![2, 2], f32_bytes(&[1.0, 2.0, 3.0, 4.0])),
                ("b", "BF16", vec![2], bf.clone()),
                ("c", "F16", vec![3, 1], f16.clone()),
            ],
        );
        let d = HfDir::open(tmp.path()).unwrap();
        assert_eq!(d.config["model_type"], "llama");
        assert_eq!(d.tensor_names(), vec!["a", "b", "c"]);
        let a = d.tensor("a").unwrap();
        assert_eq!(a.ty, GgmlType::F32);
        assert_eq!(a.shape, &[2, 2]);
        assert_eq!(a.bytes, &f32_bytes(&[1.0, 2.0, 3.0, 4.0])[..]);
        let b = d.tensor("b").unwrap();
        assert_eq!(
            (b.ty, b.shape, b.bytes),
            (GgmlType::BF16, &[2usize][..], &bf[..])
        );
        let c = d.tensor("c").unwrap();
        assert_eq!(
            (c.ty, c.shape, c.bytes),
            (GgmlType::F16, &[3usize, 1][..], &f16[..])
        );
        assert!(d.tensor("nope").is_none());
    }

    fn sharded(dir: &Path) {
        config(dir);
        write_st(
            &dir.join("model-00001-of-00002.safetensors"),
            &[
                ("x", "F32", vec![1], f32_bytes(&[7.0])),
                ("y", "F32", vec![2], f32_bytes(&[8.0, 9.0])),
            ],
        );
        write_st(
            &dir.join("model-00002-of-00002.safetensors"),
            &[("z", "F32", vec![1], f32_bytes(&[10.0]))],
        );
        let index = serde_json::json!({
            "metadata": {"total_size": 16},
            "weight_map": {
                "x": "model-00001-of-00002.safetensors",
                "y": "model-00001-of-00002.safetensors",
                "z": "model-00002-of-00002.safetensors",
            }
        });
        std::fs::write(dir.join(INDEX_FILE), index.to_string()).unwrap();
    }

    #[test]
    fn sharded_with_index() {
        let tmp = tempfile::tempdir().unwrap();
        sharded(tmp.path());
        let d = HfDir::open(tmp.path()).unwrap();
        assert_eq!(d.tensor_names(), vec!["x", "y", "z"]);
        assert_eq!(d.files().len(), 2);
        assert_eq!(d.tensor("y").unwrap().bytes, &f32_bytes(&[8.0, 9.0])[..]);
        assert_eq!(d.tensor("z").unwrap().bytes, &f32_bytes(&[10.0])[..]);
    }

    #[test]
    fn shards_without_index_are_all_read() {
        let tmp = tempfile::tempdir().unwrap();
        sharded(tmp.path());
        std::fs::remove_file(tmp.path().join(INDEX_FILE)).unwrap();
        let d = HfDir::open(tmp.path()).unwrap();
        assert_eq!(d.tensor_names(), vec!["x", "y", "z"]);
    }

    #[test]
    fn missing_shard_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        sharded(tmp.path());
        std::fs::remove_file(tmp.path().join("model-00002-of-00002.safetensors")).unwrap();
        let err = HfDir::open(tmp.path()).unwrap_err().to_string();
        assert!(
            err.contains("model-00002-of-00002.safetensors") && err.contains("does not exist"),
            "{err}"
        );
    }

    #[test]
    fn index_naming_absent_tensor_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        sharded(tmp.path());
        let index = serde_json::json!({"weight_map": {
            "x": "model-00001-of-00002.safetensors",
            "ghost": "model-00002-of-00002.safetensors",
        }});
        std::fs::write(tmp.path().join(INDEX_FILE), index.to_string()).unwrap();
        let err = HfDir::open(tmp.path()).unwrap_err().to_string();
        assert!(err.contains("'ghost'"), "{err}");
    }

    #[test]
    fn index_pointing_to_wrong_shard_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        sharded(tmp.path());
        let index = serde_json::json!({"weight_map": {
            "x": "model-00002-of-00002.safetensors",
            "z": "model-00001-of-00002.safetensors",
        }});
        std::fs::write(tmp.path().join(INDEX_FILE), index.to_string()).unwrap();
        let err = HfDir::open(tmp.path()).unwrap_err().to_string();
        assert!(err.contains("indexed in"), "{err}");
    }

    #[test]
    fn index_escaping_directory_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        sharded(tmp.path());
        let index = serde_json::json!({"weight_map": {"x": "../model-00001-of-00002.safetensors"}});
        std::fs::write(tmp.path().join(INDEX_FILE), index.to_string()).unwrap();
        let err = HfDir::open(tmp.path()).unwrap_err().to_string();
        assert!(err.contains("not a file name"), "{err}");
    }

    #[test]
    fn duplicate_tensor_across_files_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        config(tmp.path());
        write_st(
            &tmp.path().join("a.safetensors"),
            &[("x", "F32", vec![1], f32_bytes(&[1.0]))],
        );
        write_st(
            &tmp.path().join("b.safetensors"),
            &[("x", "F32", vec![1], f32_bytes(&[2.0]))],
        );
        let err = HfDir::open(tmp.path()).unwrap_err().to_string();
        assert!(err.contains("'x' also appears"), "{err}");
    }

    #[test]
    fn truncated_file_is_reported_as_truncated() {
        let tmp = tempfile::tempdir().unwrap();
        config(tmp.path());
        let p = tmp.path().join(SINGLE_FILE);
        write_st(
            &p,
            &[("a", "F32", vec![4], f32_bytes(&[1.0, 2.0, 3.0, 4.0]))],
        );
        let full = std::fs::read(&p).unwrap();
        // Cut inside the data section, then inside the header, then before the length.
        for cut in [full.len() - 3, 20, 5] {
            std::fs::write(&p, &full[..cut]).unwrap();
            let err = HfDir::open(tmp.path()).unwrap_err();
            assert!(
                matches!(err, ModelError::Truncated { .. }),
                "cut {cut}: {err}"
            );
        }
        // Trailing garbage is not "truncated" but still an error.
        let mut longer = full.clone();
        longer.extend_from_slice(&[0; 4]);
        std::fs::write(&p, &longer).unwrap();
        let err = HfDir::open(tmp.path()).unwrap_err();
        assert!(matches!(err, ModelError::Safetensors { .. }), "{err}");
    }

    #[test]
    fn unsupported_dtype_names_the_tensor() {
        let tmp = tempfile::tempdir().unwrap();
        config(tmp.path());
        write_st(
            &tmp.path().join(SINGLE_FILE),
            &[
                ("ok", "F32", vec![1], f32_bytes(&[1.0])),
                ("ids", "I64", vec![1], vec![0; 8]),
            ],
        );
        let err = HfDir::open(tmp.path()).unwrap_err();
        assert!(matches!(err, ModelError::UnsupportedType(_)), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("I64") && msg.contains("'ids'"), "{msg}");
    }

    #[test]
    fn missing_config_is_clear() {
        let tmp = tempfile::tempdir().unwrap();
        write_st(
            &tmp.path().join(SINGLE_FILE),
            &[("a", "F32", vec![1], f32_bytes(&[1.0]))],
        );
        let err = HfDir::open(tmp.path()).unwrap_err().to_string();
        assert!(err.contains("config.json"), "{err}");
        std::fs::write(tmp.path().join("config.json"), "{not json").unwrap();
        let err = HfDir::open(tmp.path()).unwrap_err().to_string();
        assert!(err.contains("invalid JSON"), "{err}");
    }

    #[test]
    fn no_weights_is_clear() {
        let tmp = tempfile::tempdir().unwrap();
        config(tmp.path());
        let err = HfDir::open(tmp.path()).unwrap_err().to_string();
        assert!(err.contains("no model.safetensors"), "{err}");
    }
}
