//! The model fingerprint: a digest that two nodes compare before they trust
//! each other's KV cache or token ids.
//!
//! It covers what changes the meaning of a KV block or a token id: the
//! architecture and hyper-parameters, every tensor's name, type and shape,
//! and the vocabulary. It deliberately does not hash the weight bytes
//! (hundreds of MB to GB, slow at start-up); two files with identical
//! structure but different weights are told apart by the hash of the first
//! and last kilobyte of every tensor, which is cheap and catches a swapped
//! checkpoint. Every TP/PP shard computes it over the whole model, so all
//! shards of one model agree.

use sha2::{Digest, Sha256};

use crate::tokenizer::Tokenizer;
use crate::weights::ModelSource;

/// Hex digest, 32 characters (128 bits).
pub fn fingerprint(model: &ModelSource, tokenizer: &Tokenizer) -> String {
    let mut h = Sha256::new();
    h.update(b"tandem-fingerprint-v1\0");
    h.update(serde_json::to_vec(&model.config).unwrap_or_default());
    for (name, ty, shape) in model.tensor_table() {
        h.update(name.as_bytes());
        h.update([0]);
        h.update(ty.id().to_le_bytes());
        for d in &shape {
            h.update((*d as u64).to_le_bytes());
        }
        if let Some(t) = model.get(&name) {
            let n = t.bytes.len();
            h.update(&t.bytes[..n.min(1024)]);
            h.update(&t.bytes[n.saturating_sub(1024)..]);
        }
    }
    for (id, tok) in tokenizer.vocab_sorted() {
        h.update(id.to_le_bytes());
        h.update(tok.as_bytes());
        h.update([0]);
    }
    hex::encode(&h.finalize()[..16])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Arch;
    use crate::quant::GgmlType;
    use crate::synth::{synth, SynthFormat, SynthShape, SynthSpec, SynthTokenizer};

    fn make(dir: &std::path::Path, name: &str, seed: u64, ty: GgmlType) -> String {
        let path = dir.join(name);
        let spec = SynthSpec {
            arch: Arch::Llama,
            shape: SynthShape::preset("tiny").unwrap(),
            seed,
            format: SynthFormat::Gguf { weight_type: ty },
            tokenizer: SynthTokenizer::Gpt2,
        };
        synth(&spec, &path).unwrap();
        let m = ModelSource::open(&path).unwrap();
        fingerprint(&m, &m.tokenizer().unwrap())
    }

    #[test]
    fn same_model_same_fingerprint_other_weights_or_types_differ() {
        let dir = tempfile::tempdir().unwrap();
        let a = make(dir.path(), "a.gguf", 1, GgmlType::Q8_0);
        let a_again = make(dir.path(), "a2.gguf", 1, GgmlType::Q8_0);
        let other_seed = make(dir.path(), "b.gguf", 2, GgmlType::Q8_0);
        let other_type = make(dir.path(), "c.gguf", 1, GgmlType::Q4_0);
        assert_eq!(a.len(), 32);
        assert_eq!(
            a, a_again,
            "the fingerprint depends on the content, not the path"
        );
        assert_ne!(a, other_seed, "other weights");
        assert_ne!(a, other_type, "other tensor types");
    }
}
