//! Kernel tests: every kernel, weight type, shape, batch size and thread
//! count must reproduce [`matmul_reference`] over the reference
//! dequantisation bit for bit. Plus an `#[ignore]`d benchmark.

use super::*;
use tandem_model::quant::dequantize_row;

/// splitmix64: small, seedable, no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    fn f(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

const ALL_TYPES: [GgmlType; 9] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q8_0,
    GgmlType::Q4K,
    GgmlType::Q5K,
    GgmlType::Q6K,
];

fn put_f16(b: &mut [u8], at: usize, v: f32) {
    b[at..at + 2].copy_from_slice(&half::f16::from_f32(v).to_bits().to_le_bytes());
}

/// Random but well-formed bytes of a `[rows, cols]` tensor of type `ty`.
fn random_tensor(ty: GgmlType, rows: usize, cols: usize, rng: &mut Rng) -> Vec<u8> {
    let n = ty.bytes_for(cols).unwrap() * rows;
    let mut b: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
    match ty {
        GgmlType::F32 => {
            for c in b.chunks_exact_mut(4) {
                c.copy_from_slice(&rng.f().to_le_bytes());
            }
        }
        GgmlType::F16 => {
            for c in b.chunks_exact_mut(2) {
                put_f16(c, 0, rng.f());
            }
        }
        GgmlType::BF16 => {
            for c in b.chunks_exact_mut(2) {
                c.copy_from_slice(&half::bf16::from_f32(rng.f()).to_bits().to_le_bytes());
            }
        }
        _ => {
            let bb = ty.block_bytes();
            for blk in b.chunks_exact_mut(bb) {
                let (d, m) = (rng.f() * 0.05, rng.f() * 0.05);
                match ty {
                    GgmlType::Q4_0 | GgmlType::Q8_0 => put_f16(blk, 0, d),
                    GgmlType::Q4_1 | GgmlType::Q4K | GgmlType::Q5K => {
                        put_f16(blk, 0, d);
                        put_f16(blk, 2, m);
                    }
                    GgmlType::Q6K => put_f16(blk, 208, d),
                    _ => unreachable!(),
                }
            }
        }
    }
    b
}

/// Reference dequantisation of a whole tensor.
fn dequant_all(ty: GgmlType, bytes: &[u8], rows: usize, cols: usize) -> Vec<f32> {
    let rb = ty.bytes_for(cols).unwrap();
    let mut w = vec![0f32; rows * cols];
    for r in 0..rows {
        dequantize_row(
            ty,
            &bytes[r * rb..(r + 1) * rb],
            &mut w[r * cols..(r + 1) * cols],
        )
        .unwrap();
    }
    w
}

fn kernels_here() -> Vec<Kernel> {
    let mut v = vec![Kernel::Scalar];
    for k in [Kernel::Avx2, Kernel::Avx512] {
        if k.available() {
            v.push(k);
        } else {
            println!("skipping the {} kernel: this CPU lacks it", k.name());
        }
    }
    v
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|f| f.to_bits()).collect()
}

fn check_shape(
    ty: GgmlType,
    rows: usize,
    cols: usize,
    token_counts: &[usize],
    pools: &[ThreadPool],
    rng: &mut Rng,
) {
    check_shape_with(ty, rows, cols, token_counts, pools, rng, false)
}

/// [`check_shape`], optionally with the f32 copy of the weights made first
/// (the GEMM path then reads it instead of expanding panels).
fn check_shape_with(
    ty: GgmlType,
    rows: usize,
    cols: usize,
    token_counts: &[usize],
    pools: &[ThreadPool],
    rng: &mut Rng,
    f32_copy: bool,
) {
    let bytes = random_tensor(ty, rows, cols, rng);
    let shape = [rows, cols];
    let t = TensorRef {
        ty,
        shape: &shape,
        bytes: &bytes,
    };
    let mut m = PackedMatrix::from_tensor(&t).unwrap();
    assert_eq!((m.rows(), m.cols()), (rows, cols));
    if f32_copy {
        m.expand_f32();
        assert!(m.has_f32_copy());
    }
    let wref = dequant_all(ty, &bytes, rows, cols);
    for &tokens in token_counts {
        let x: Vec<f32> = (0..tokens * cols).map(|_| rng.f()).collect();
        let mut want = vec![0f32; tokens * rows];
        matmul_reference(&wref, rows, cols, &x, tokens, &mut want);
        for kernel in kernels_here() {
            for pool in pools {
                let mut got = vec![f32::NAN; tokens * rows];
                matmul_with(kernel, pool, &m, &x, tokens, &mut got);
                assert!(
                    bits(&got) == bits(&want),
                    "{} kernel, {} [{rows}x{cols}]{}, {tokens} tokens, {} threads: first mismatch at {:?}",
                    kernel.name(),
                    ty.name(),
                    if f32_copy { " with f32 copy" } else { "" },
                    pool.threads(),
                    got.iter().zip(&want).position(|(a, b)| a.to_bits() != b.to_bits())
                );
            }
        }
    }
}

#[test]
fn kernels_match_reference_bit_for_bit_every_type() {
    let pools = [ThreadPool::new(1), ThreadPool::new(2), ThreadPool::new(3)];
    let mut rng = Rng(7);
    let tokens = [1, 2, 3, 4, 5, 7, 13, 30];
    for ty in ALL_TYPES {
        let be = ty.block_elems();
        let col_choices: Vec<usize> = if ty.is_float() {
            vec![1, 2, 7, 63, 64, 65, 129, 200]
        } else if be == 32 {
            vec![32, 64, 96, 160, 576]
        } else {
            vec![256, 512, 768]
        };
        for &cols in &col_choices {
            for rows in [1, 15, 16, 17, 40, 48] {
                check_shape(ty, rows, cols, &tokens, &pools, &mut rng);
            }
        }
    }
}

#[test]
fn f32_copy_path_matches_reference_bit_for_bit_every_type() {
    // Token counts on both sides of the fused/GEMM switch (with and without
    // a copy), odd ones, partial token tiles, and more than one token block.
    let pools = [ThreadPool::new(1), ThreadPool::new(2), ThreadPool::new(3)];
    let mut rng = Rng(17);
    let tokens = [1, 8, 9, 13, 17, 31, 32, 33, 97];
    for ty in ALL_TYPES {
        let be = ty.block_elems();
        let col_choices: Vec<usize> = if ty.is_float() {
            vec![1, 7, 64, 65, 200]
        } else if be == 32 {
            vec![32, 96, 160, 576]
        } else {
            vec![256, 768]
        };
        for &cols in &col_choices {
            for rows in [1, 17, 48] {
                check_shape_with(ty, rows, cols, &tokens, &pools, &mut rng, true);
            }
        }
    }
}

#[test]
fn f32_copy_equals_the_packed_weights_and_changes_no_output() {
    let mut rng = Rng(23);
    let pool = ThreadPool::new(2);
    for ty in ALL_TYPES {
        let (rows, cols) = (37, if ty.is_float() { 130 } else { 512 });
        let bytes = random_tensor(ty, rows, cols, &mut rng);
        let shape = [rows, cols];
        let t = TensorRef {
            ty,
            shape: &shape,
            bytes: &bytes,
        };
        let plain = PackedMatrix::from_tensor(&t).unwrap();
        let mut copy = PackedMatrix::from_tensor(&t).unwrap();
        assert!(!copy.has_f32_copy());
        copy.expand_f32();
        copy.expand_f32(); // idempotent
        assert_eq!(
            copy.expanded_nbytes(),
            rows.div_ceil(PANEL) * cols * PANEL * 4
        );
        // The copy holds the reference dequantisation, lane by lane.
        let want = dequant_all(ty, &bytes, rows, cols);
        let e = copy.expanded.as_ref().unwrap().as_slice();
        for r in 0..rows {
            for k in 0..cols {
                let o = ((r / PANEL * cols + k) * PANEL + r % PANEL) * 4;
                let got = f32::from_le_bytes(e[o..o + 4].try_into().unwrap());
                assert_eq!(
                    got.to_bits(),
                    want[r * cols + k].to_bits(),
                    "{} w[{r}][{k}]",
                    ty.name()
                );
            }
        }
        for tokens in [5, 24, 40] {
            let x: Vec<f32> = (0..tokens * cols).map(|_| rng.f()).collect();
            let mut a = vec![0f32; tokens * rows];
            let mut b = vec![0f32; tokens * rows];
            matmul(&pool, &plain, &x, tokens, &mut a);
            matmul(&pool, &copy, &x, tokens, &mut b);
            assert_eq!(bits(&a), bits(&b), "{} {tokens} tokens", ty.name());
        }
    }
}

#[test]
fn expand_weights_policy_parses_and_decides() {
    assert_eq!(
        "auto".parse::<ExpandWeights>().unwrap(),
        ExpandWeights::Auto
    );
    assert_eq!(" ON ".parse::<ExpandWeights>().unwrap(), ExpandWeights::On);
    assert_eq!("off".parse::<ExpandWeights>().unwrap(), ExpandWeights::Off);
    assert!("sometimes".parse::<ExpandWeights>().is_err());
    assert_eq!(ExpandWeights::default(), ExpandWeights::Auto);
    assert!(ExpandWeights::On.decide(usize::MAX));
    assert!(!ExpandWeights::Off.decide(0));
    // Auto never takes more than the machine has.
    assert!(!ExpandWeights::Auto.decide(usize::MAX));
}

#[test]
fn kernels_match_reference_on_random_shapes() {
    let pools = [ThreadPool::new(2)];
    let mut rng = Rng(99);
    for _ in 0..40 {
        let ty = ALL_TYPES[rng.below(ALL_TYPES.len())];
        let be = ty.block_elems().max(1);
        let cols = if ty.is_float() {
            1 + rng.below(300)
        } else {
            be * (1 + rng.below(if be == 32 { 12 } else { 3 }))
        };
        let rows = 1 + rng.below(100);
        let tokens = 1 + rng.below(40);
        let f32_copy = rng.below(2) == 1;
        check_shape_with(ty, rows, cols, &[tokens], &pools, &mut rng, f32_copy);
    }
}

#[test]
fn q6k_with_f16_exact_scales_uses_and_matches_half_parameters() {
    // Power-of-two `d` makes every `d * scale` an exact f16: the packer then
    // stores f16 parameters for a 16-long sub-block type.
    let mut rng = Rng(21);
    let (rows, cols) = (37, 512);
    let mut bytes = random_tensor(GgmlType::Q6K, rows, cols, &mut rng);
    for blk in bytes.chunks_exact_mut(GgmlType::Q6K.block_bytes()) {
        put_f16(blk, 208, 1.0 / 1024.0);
    }
    let shape = [rows, cols];
    let m = PackedMatrix::from_tensor(&TensorRef {
        ty: GgmlType::Q6K,
        shape: &shape,
        bytes: &bytes,
    })
    .unwrap();
    assert_eq!(
        m.fmt,
        Format::Q8 {
            sub: 16,
            half: true
        }
    );
    let wref = dequant_all(GgmlType::Q6K, &bytes, rows, cols);
    let pool = ThreadPool::new(2);
    for tokens in [1, 3, 9] {
        let x: Vec<f32> = (0..tokens * cols).map(|_| rng.f()).collect();
        let mut want = vec![0f32; tokens * rows];
        matmul_reference(&wref, rows, cols, &x, tokens, &mut want);
        for kernel in kernels_here() {
            let mut got = vec![0f32; tokens * rows];
            matmul_with(kernel, &pool, &m, &x, tokens, &mut got);
            assert_eq!(
                bits(&got),
                bits(&want),
                "{} kernel, {tokens} tokens",
                kernel.name()
            );
        }
    }
}

#[test]
fn gemm_tiles_and_blocks_match_reference() {
    // Enough tokens to cross token tiles and task blocks, odd panel counts.
    let pools = [ThreadPool::new(2)];
    let mut rng = Rng(3);
    for ty in [GgmlType::Q4_1, GgmlType::Q8_0, GgmlType::F32, GgmlType::Q6K] {
        let cols = if ty == GgmlType::Q6K { 256 } else { 96 };
        check_shape(ty, 3 * 16 + 5, cols, &[97, 200], &pools, &mut rng);
    }
}

#[test]
fn results_do_not_depend_on_batching() {
    // A token's outputs are the same alone, in a small batch or in a big one.
    let mut rng = Rng(11);
    let (rows, cols) = (70, 320);
    let bytes = random_tensor(GgmlType::Q4_1, rows, cols, &mut rng);
    let shape = [rows, cols];
    let m = PackedMatrix::from_tensor(&TensorRef {
        ty: GgmlType::Q4_1,
        shape: &shape,
        bytes: &bytes,
    })
    .unwrap();
    let pool = ThreadPool::new(2);
    let tokens = 50;
    let x: Vec<f32> = (0..tokens * cols).map(|_| rng.f()).collect();
    let mut all = vec![0f32; tokens * rows];
    matmul(&pool, &m, &x, tokens, &mut all);
    for t in [0, 17, 49] {
        let mut one = vec![0f32; rows];
        matmul(&pool, &m, &x[t * cols..(t + 1) * cols], 1, &mut one);
        assert_eq!(bits(&one), bits(&all[t * rows..(t + 1) * rows]));
    }
}

#[test]
fn row_into_is_the_reference_dequantisation() {
    let mut rng = Rng(5);
    for ty in ALL_TYPES {
        let cols = if ty.is_float() { 70 } else { 256 };
        let rows = 19;
        let bytes = random_tensor(ty, rows, cols, &mut rng);
        let shape = [rows, cols];
        let m = PackedMatrix::from_tensor(&TensorRef {
            ty,
            shape: &shape,
            bytes: &bytes,
        })
        .unwrap();
        let want = dequant_all(ty, &bytes, rows, cols);
        let mut got = vec![0f32; cols];
        for r in 0..rows {
            m.row_into(r, &mut got);
            assert_eq!(
                bits(&got),
                bits(&want[r * cols..(r + 1) * cols]),
                "{} row {r}",
                ty.name()
            );
        }
    }
}

#[test]
fn packed_quantised_weights_stay_compressed() {
    let mut rng = Rng(1);
    let (rows, cols) = (64, 576);
    for (ty, max_bits) in [
        (GgmlType::Q4_1, 5.0),
        (GgmlType::Q4_0, 5.0),
        (GgmlType::Q8_0, 9.0),
    ] {
        let bytes = random_tensor(ty, rows, cols, &mut rng);
        let shape = [rows, cols];
        let m = PackedMatrix::from_tensor(&TensorRef {
            ty,
            shape: &shape,
            bytes: &bytes,
        })
        .unwrap();
        let bpw = m.nbytes() as f64 * 8.0 / (rows * cols) as f64;
        assert!(bpw <= max_bits, "{}: {bpw} bits per weight", ty.name());
    }
}

#[test]
fn kernel_names_parse() {
    assert_eq!(Kernel::parse("scalar"), Some(Kernel::Scalar));
    assert_eq!(Kernel::parse(" AVX2 "), Some(Kernel::Avx2));
    assert_eq!(Kernel::parse("avx512"), Some(Kernel::Avx512));
    assert_eq!(Kernel::parse("neon"), None);
    assert!(selected_kernel().available());
}

#[test]
fn rejects_non_matrices_and_short_data() {
    let shape = [4usize];
    let b = vec![0u8; 16];
    assert!(PackedMatrix::from_tensor(&TensorRef {
        ty: GgmlType::F32,
        shape: &shape,
        bytes: &b
    })
    .is_err());
    let shape = [4usize, 4];
    assert!(PackedMatrix::from_tensor(&TensorRef {
        ty: GgmlType::F32,
        shape: &shape,
        bytes: &b
    })
    .is_err());
}

/// CPU time (ns) consumed so far by all threads of this process, from
/// `/proc/self/task/*/schedstat`: benchmarks print throughput per CPU
/// second too, which stays meaningful when other processes share the cores.
fn cpu_ns() -> u64 {
    let mut total = 0;
    if let Ok(rd) = std::fs::read_dir("/proc/self/task") {
        for e in rd.flatten() {
            if let Ok(s) = std::fs::read_to_string(e.path().join("schedstat")) {
                total += s
                    .split_whitespace()
                    .next()
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
    }
    total
}

/// Times `iters` calls of `f`: (wall seconds per call, CPU seconds per call).
fn time_it(iters: usize, mut f: impl FnMut()) -> (f64, f64) {
    f();
    let c0 = cpu_ns();
    let t = std::time::Instant::now();
    for _ in 0..iters {
        f();
    }
    let wall = t.elapsed().as_secs_f64() / iters as f64;
    let cpu = (cpu_ns() - c0) as f64 * 1e-9 / iters as f64;
    (wall, cpu)
}

/// A benchmark setting from the environment: `name` parsed as a count, or
/// `default` when unset or not a number.
fn bench_env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Throughput on the default model's shapes (SmolLM2-135M Q4_1, Q8_0 LM
/// head), streaming all 30 layers so that weights come from memory:
/// `cargo test --release -p tandem-engine bench_kernels -- --ignored --nocapture`
/// (`TANDEM_BENCH_THREADS`, `TANDEM_KERNEL` apply). Prints wall-clock rates
/// and, in brackets, rates per CPU-second of this process.
#[test]
#[ignore]
fn bench_kernels() {
    let threads = bench_env("TANDEM_BENCH_THREADS", 2);
    let pool = ThreadPool::new(threads);
    let kernel = selected_kernel();
    let mut rng = Rng(42);
    let layer_shapes = [
        (576, 576),
        (192, 576),
        (192, 576),
        (576, 576),
        (1536, 576),
        (1536, 576),
        (576, 1536),
    ];
    let pack = |ty, rows, cols, rng: &mut Rng| {
        let bytes = random_tensor(ty, rows, cols, rng);
        let shape = [rows, cols];
        PackedMatrix::from_tensor(&TensorRef {
            ty,
            shape: &shape,
            bytes: &bytes,
        })
        .unwrap()
    };
    let t = std::time::Instant::now();
    let mut mats: Vec<PackedMatrix> = Vec::new();
    for _ in 0..30 {
        for &(r, c) in &layer_shapes {
            mats.push(pack(GgmlType::Q4_1, r, c, &mut rng));
        }
    }
    let mut head = pack(GgmlType::Q8_0, 49152, 576, &mut rng);
    if std::env::var("TANDEM_BENCH_EXPAND").is_ok_and(|v| v == "1") {
        for m in mats.iter_mut().chain(std::iter::once(&mut head)) {
            m.expand_f32();
        }
        println!("with f32 copies of the weights");
    }
    println!(
        "kernel {}, {threads} threads; packed in {:.2?}",
        kernel.name(),
        t.elapsed()
    );
    let body_w: usize = mats.iter().map(|m| m.rows() * m.cols()).sum();
    let body_bytes: usize = mats.iter().map(|m| m.nbytes()).sum();
    let total_bytes = body_bytes + head.nbytes();
    let flops_per_token = 2.0 * (body_w + head.rows() * head.cols()) as f64;
    println!(
        "packed: layers {:.1} MB ({:.2} bits/weight), head {:.1} MB",
        body_bytes as f64 / 1e6,
        body_bytes as f64 * 8.0 / body_w as f64,
        head.nbytes() as f64 / 1e6,
    );
    // What plain streaming reads achieve right now, for comparison (other
    // processes on the machine change it).
    {
        let big: Vec<u64> = (0..(256usize << 20) / 8).map(|i| i as u64).collect();
        let n_tasks = threads * 8;
        let sums: Vec<std::sync::atomic::AtomicU64> =
            (0..n_tasks).map(|_| Default::default()).collect();
        let (wall, _) = time_it(3, || {
            pool.run(n_tasks, &|i| {
                let s = big[split(big.len(), n_tasks, i)]
                    .iter()
                    .fold(0u64, |acc, v| acc.wrapping_add(*v));
                sums[i].store(s, std::sync::atomic::Ordering::Relaxed);
            })
        });
        println!(
            "plain read bandwidth, {threads} threads: {:.1} GB/s",
            (big.len() * 8) as f64 / wall / 1e9
        );
    }
    let x: Vec<f32> = (0..512 * 1536).map(|_| rng.f()).collect();
    let mut out = vec![0f32; 512 * 49152];
    let batches: Vec<usize> = std::env::var("TANDEM_BENCH_BATCHES")
        .ok()
        .map(|s| s.split(',').filter_map(|v| v.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 2, 4, 8, 16, 32]);
    let only_batches = std::env::var("TANDEM_BENCH_BATCHES").is_ok();
    for &tokens in &batches {
        let (wall, cpu) = time_it(if only_batches { 100 } else { 10 }, || {
            for m in &mats {
                matmul(
                    &pool,
                    m,
                    &x[..tokens * m.cols()],
                    tokens,
                    &mut out[..tokens * m.rows()],
                );
            }
            matmul(
                &pool,
                &head,
                &x[..tokens * 576],
                tokens,
                &mut out[..tokens * 49152],
            );
        });
        println!(
            "whole model, batch {tokens:2}: {:6.2} ms/step, {:5.0} tok/s, {:5.1} GB/s, {:6.1} GFLOP/s  [per CPU-s: {:5.0} tok, {:6.1} GFLOP]",
            wall * 1e3,
            tokens as f64 / wall,
            total_bytes as f64 / wall / 1e9,
            flops_per_token * tokens as f64 / wall / 1e9,
            tokens as f64 / cpu,
            flops_per_token * tokens as f64 / cpu / 1e9,
        );
    }
    if only_batches {
        return;
    }
    for &(r, c) in &[(576usize, 576usize), (192, 576), (1536, 576), (576, 1536)] {
        let m = &mats[layer_shapes.iter().position(|s| *s == (r, c)).unwrap()];
        let tokens = 512;
        let (wall, cpu) = time_it(10, || {
            matmul(&pool, m, &x[..tokens * c], tokens, &mut out[..tokens * r])
        });
        let f = 2.0 * (r * c * tokens) as f64;
        println!(
            "GEMM {r:4}x{c:4} Q4_1, {tokens} tokens: {:7.3} ms, {:6.1} GFLOP/s  [per CPU-s: {:6.1} GFLOP]",
            wall * 1e3,
            f / wall / 1e9,
            f / cpu / 1e9
        );
    }
    let tokens = 512;
    let (wall, cpu) = time_it(2, || {
        for m in &mats {
            matmul(
                &pool,
                m,
                &x[..tokens * m.cols()],
                tokens,
                &mut out[..tokens * m.rows()],
            );
        }
    });
    let f = 2.0 * body_w as f64 * tokens as f64;
    println!(
        "all layers, {tokens} tokens (no head): {:.1} ms, {:.1} GFLOP/s  [per CPU-s: {:.1} GFLOP]",
        wall * 1e3,
        f / wall / 1e9,
        f / cpu / 1e9
    );
}

/// Per-shape timing with the weights hot in cache (compute speed, little
/// memory traffic): `… bench_gemv_hot -- --ignored --nocapture`.
#[test]
#[ignore]
fn bench_gemv_hot() {
    let threads = bench_env("TANDEM_BENCH_THREADS", 2);
    let pool = ThreadPool::new(threads);
    let mut rng = Rng(42);
    println!("kernel {}, {threads} threads", selected_kernel().name());
    for (ty, rows, cols) in [
        (GgmlType::Q4_1, 1536, 576),
        (GgmlType::Q4_1, 576, 1536),
        (GgmlType::Q8_0, 1536, 576),
        (GgmlType::F32, 1536, 576),
    ] {
        let bytes = random_tensor(ty, rows, cols, &mut rng);
        let shape = [rows, cols];
        let m = PackedMatrix::from_tensor(&TensorRef {
            ty,
            shape: &shape,
            bytes: &bytes,
        })
        .unwrap();
        for tokens in [1usize, 2, 4, 8, 16, 64] {
            let x: Vec<f32> = (0..tokens * cols).map(|_| rng.f()).collect();
            let mut out = vec![0f32; tokens * rows];
            let (wall, cpu) = time_it(2000 / tokens, || matmul(&pool, &m, &x, tokens, &mut out));
            println!(
                "{:4} {rows}x{cols} {tokens:2} tokens: {:7.1} us, {:5.2} Gweight/s, {:6.1} GFLOP/s  [per CPU-s: {:5.2} Gweight, {:6.1} GFLOP]",
                ty.name(),
                wall * 1e6,
                (rows * cols) as f64 / wall / 1e9,
                2.0 * (rows * cols * tokens) as f64 / wall / 1e9,
                (rows * cols) as f64 / cpu / 1e9,
                2.0 * (rows * cols * tokens) as f64 / cpu / 1e9
            );
        }
    }
}

/// Decode attention on the default model's shape (30 layers, 9 query heads
/// over 3 KV heads of 64 dims, 16-token blocks) for a batch of sequences
/// whose blocks interleave in the pool as decode leaves them:
/// `cargo test --release -p tandem-engine bench_attention -- --ignored --nocapture`
/// (`TANDEM_BENCH_THREADS`, `TANDEM_BENCH_BATCH`, `TANDEM_BENCH_CONTEXT`,
/// `TANDEM_BENCH_ITERS`).
/// Prints milliseconds per step and the KV read rate.
#[test]
#[ignore]
fn bench_attention() {
    use crate::kv::{KvDtype, KvLayout, KvPool};
    let threads = bench_env("TANDEM_BENCH_THREADS", 2);
    let batch = bench_env("TANDEM_BENCH_BATCH", 32);
    let context = bench_env("TANDEM_BENCH_CONTEXT", 192);
    let (n_layers, nkv, n_rep, hd, bs) = (30, 3, 3, 64, 16);
    let layout = KvLayout {
        dtype: KvDtype::F32,
        n_layers,
        n_kv_heads: nkv,
        head_dim: hd,
        block_size: bs,
    };
    let per_seq = context.div_ceil(bs);
    let mut pool = KvPool::new(layout, batch * per_seq);
    // Prompts take their blocks one sequence after another; decode then
    // takes one block per sequence in turn.
    let prompt_blocks = per_seq / 2;
    let mut tables = vec![Vec::new(); batch];
    for t in tables.iter_mut() {
        for _ in 0..prompt_blocks {
            t.push(pool.alloc().expect("sized for the batch"));
        }
    }
    for _ in prompt_blocks..per_seq {
        for t in tables.iter_mut() {
            t.push(pool.alloc().expect("sized for the batch"));
        }
    }
    let mut rng = Rng(7);
    for l in 0..n_layers {
        for b in 0..pool.n_blocks() {
            for v in pool.region_mut(l, b as crate::kv::BlockId) {
                *v = rng.f();
            }
        }
    }
    let qd = nkv * n_rep * hd;
    let q: Vec<f32> = (0..batch * qd).map(|_| rng.f()).collect();
    let mut out = vec![0f32; batch * qd];
    let tp = ThreadPool::new(threads);
    let scale = 1.0 / (hd as f32).sqrt();
    let mut step = || {
        for l in 0..n_layers {
            let layer = pool.layer(l);
            let o = SendPtr(out.as_mut_ptr());
            tp.run(batch * nkv, &|i| {
                let (si, g) = (i / nkv, i % nkv);
                let kv = crate::ops::PagedKv {
                    layer,
                    blocks: &tables[si],
                    block_size: bs,
                    block_floats: layout.block_floats(),
                    k_off: layout.k_offset(g),
                    v_off: layout.v_offset(g),
                };
                let mut scores = vec![0f32; n_rep * context];
                let off = si * qd + g * n_rep * hd;
                // SAFETY: (sequence, group) outputs are disjoint.
                let dst = unsafe { std::slice::from_raw_parts_mut(o.get().add(off), n_rep * hd) };
                crate::ops::attend_many(
                    &q[off..off + n_rep * hd],
                    qd,
                    1,
                    hd,
                    n_rep,
                    &kv,
                    context,
                    scale,
                    &mut scores,
                    dst,
                    qd,
                );
            });
        }
    };
    step();
    let (wall, _) = time_it(bench_env("TANDEM_BENCH_ITERS", 20), step);
    let bytes = (batch * context * layout.token_bytes()) as f64;
    println!(
        "attention, {threads} threads, batch {batch}, context {context}: {:.2} ms per step, {:.1} GB/s of KV",
        wall * 1e3,
        bytes / wall / 1e9
    );
}
