//! `--device`: where a worker's (or `generate`'s) engine runs.

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use tandem_engine::cpu::ExpandWeights;
use tandem_engine::executor::Executor;
use tandem_engine::model::Model;
use tandem_model::weights::ModelSource;

/// The compute device of one engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// The CPU kernels (the default).
    Cpu,
    /// GPU `ordinal` through the CUDA backend (binary built with the `cuda`
    /// feature): f32 weights and KV, compared token for token with the
    /// CPU, or BF16 weights and KV (see `KvPrecision::for_weights`), the
    /// faster opt-in path with looser logits.
    Cuda { ordinal: usize, bf16: bool },
}

impl std::str::FromStr for Device {
    type Err = String;

    /// `cpu`, `cuda`, `cuda:N`, `cuda-bf16` or `cuda-bf16:N`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (kind, ordinal) = match s.split_once(':') {
            Some((k, n)) => (
                k,
                n.parse::<usize>()
                    .map_err(|_| format!("{s:?}: the GPU number after ':' must be an integer"))?,
            ),
            None => (s, 0),
        };
        match kind {
            "cpu" if ordinal == 0 && !s.contains(':') => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda {
                ordinal,
                bf16: false,
            }),
            "cuda-bf16" => Ok(Device::Cuda {
                ordinal,
                bf16: true,
            }),
            _ => Err(format!(
                "{s:?}: expected cpu, cuda, cuda:N, cuda-bf16 or cuda-bf16:N"
            )),
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda { ordinal, bf16 } => {
                write!(f, "cuda{}:{ordinal}", if *bf16 { "-bf16" } else { "" })
            }
        }
    }
}

/// Loads a whole (unsharded) model onto `device`, with `loras`.
pub fn load_whole(
    src: &ModelSource,
    device: Device,
    threads: usize,
    expand: ExpandWeights,
    loras: &[crate::lora::LoraArg],
    limits: tandem_engine::engine::AdapterLimits,
) -> Result<Arc<dyn Executor>> {
    match device {
        Device::Cpu => {
            let mut m = Model::load_with(src, threads, expand).context("loading weights")?;
            crate::lora::attach(&mut m, loras, limits)?;
            Ok(Arc::new(m))
        }
        Device::Cuda { .. } if !loras.is_empty() => {
            bail!("--lora with --device {device}: LoRA adapters run on the CPU only for now")
        }
        Device::Cuda { ordinal, bf16 } => load_cuda(src, ordinal, bf16),
    }
}

#[cfg(feature = "cuda")]
fn load_cuda(src: &ModelSource, ordinal: usize, bf16: bool) -> Result<Arc<dyn Executor>> {
    use tandem_engine::cuda::{CudaModel, Weights};
    let weights = if bf16 { Weights::Bf16 } else { Weights::F32 };
    let m = CudaModel::load(src, ordinal, weights)
        .with_context(|| format!("loading the model onto GPU {ordinal}"))?;
    Ok(Arc::new(m))
}

#[cfg(not(feature = "cuda"))]
fn load_cuda(_: &ModelSource, _: usize, _: bool) -> Result<Arc<dyn Executor>> {
    bail!("--device cuda: this tandem was built without CUDA support (build it with `cargo build --release --features cuda`)")
}

/// Refuses device and sharding combinations that do not exist yet.
pub fn check_sharding(device: Device, tp: usize, pp: usize, loras: usize) -> Result<()> {
    if device != Device::Cpu && tp * pp > 1 {
        bail!("--device {device} with --tp/--pp: sharded workers run on the CPU only for now");
    }
    if loras > 0 && tp * pp > 1 {
        bail!("--lora with --tp/--pp: LoRA adapters run on unsharded workers only for now");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_parse_and_print_back() {
        for (s, d) in [
            ("cpu", Device::Cpu),
            (
                "cuda",
                Device::Cuda {
                    ordinal: 0,
                    bf16: false,
                },
            ),
            (
                "cuda:3",
                Device::Cuda {
                    ordinal: 3,
                    bf16: false,
                },
            ),
            (
                "cuda-bf16",
                Device::Cuda {
                    ordinal: 0,
                    bf16: true,
                },
            ),
            (
                "cuda-bf16:1",
                Device::Cuda {
                    ordinal: 1,
                    bf16: true,
                },
            ),
        ] {
            assert_eq!(s.parse::<Device>(), Ok(d), "{s}");
            assert_eq!(d.to_string().parse::<Device>(), Ok(d));
        }
        for bad in ["gpu", "cuda:x", "cpu:1", "", "cuda:"] {
            let e = bad.parse::<Device>().unwrap_err();
            assert!(
                e.contains("expected") || e.contains("integer"),
                "{bad}: {e}"
            );
        }
        assert!(check_sharding(Device::Cpu, 2, 2, 0).is_ok());
        assert!(check_sharding(Device::Cpu, 1, 1, 2).is_ok());
        assert!(check_sharding(Device::Cpu, 2, 1, 1).is_err());
        assert!(check_sharding(
            Device::Cuda {
                ordinal: 0,
                bf16: false
            },
            1,
            1,
            0
        )
        .is_ok());
        let e = check_sharding(
            Device::Cuda {
                ordinal: 0,
                bf16: false,
            },
            2,
            1,
            0,
        )
        .unwrap_err();
        assert!(e.to_string().contains("CPU only"), "{e}");
    }
}
