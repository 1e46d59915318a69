//! Fused shared-randomness kernels (`prng.wgsl`): regenerate the ChaCha8
//! stream of [`tally_protocol::prng`] on the GPU and apply `x += s·z` in the
//! same pass, never writing `z` to memory. Each kernel's reference is the
//! protocol's CPU code, and the tests compare bits, not tolerances.
//!
//! Limits, each a device limit rather than one of ours: a vector larger than
//! the device's largest storage binding is processed in chunks of whole tiles
//! (bound at an offset); its size must fit the device's largest buffer. The
//! dispatch grid is 2-D, so tiles beyond the 65,535-workgroups-per-dimension
//! limit run as further rows.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use burn::tensor::wgpu::wgpu;
use tally_protocol::prng::{DirectionApplier, StreamId};

use super::{Gpu, GpuError};

/// Elements per workgroup tile in the Rademacher kernels (`TILE` in the
/// shader): 256 threads × 64 registers.
const TILE: u64 = 16_384;
/// Elements per workgroup tile in the uniform kernel (`UTILE`).
const UTILE: u64 = 4_096;
/// Largest workgroup count per grid dimension (WebGPU's minimum limit,
/// which is what every adapter guarantees).
const MAX_GROUPS_PER_DIM: u64 = 65_535;
/// Directions per dispatch: each costs 36 bytes of the direction buffer and
/// one regeneration per tile; batching keeps the buffer small, and batches run
/// in order, so the result does not depend on the batch size.
const DIRS_PER_DISPATCH: usize = 4_096;
/// u32 words per direction in the direction buffer: 8 key words, the scale.
const DIR_WORDS: usize = 9;

/// The compiled pipelines.
pub(super) struct Kernels {
    apply_rademacher: wgpu::ComputePipeline,
    perturbed_into: wgpu::ComputePipeline,
    apply_uniform: wgpu::ComputePipeline,
    stream_words: wgpu::ComputePipeline,
    copy: wgpu::ComputePipeline,
}

/// Parameters per thread in the Rademacher kernels (`TILE / 256`).
const PER_THREAD: u64 = 64;
/// Parameters per thread in the uniform kernel (`UTILE / 256`).
const U_PER_THREAD: u64 = 16;

/// `prng.wgsl` plus the kernels whose per-element statements are written
/// out here (see the comment in the shader): element `j` of thread `t` is
/// `tile_start + j·256 + t`, so every load and store of a warp is coalesced.
fn shader_source() -> String {
    use std::fmt::Write;
    let mut s = String::from(include_str!("prng.wgsl"));
    // Loads clamp the index (always in bounds; the tail's duplicates are
    // never stored); stores are guarded.
    let loads = |s: &mut String, src: &str, per: u64| {
        for j in 0..per {
            let _ = writeln!(s, "    var a{j} = {src}[min(base + {}u, last)];", j * 256);
        }
    };
    let stores = |s: &mut String, per: u64| {
        for j in 0..per {
            let _ = writeln!(s, "    if (base + {o}u < prm.n) {{ x[base + {o}u] = a{j}; }}", o = j * 256);
        }
    };
    let head = |s: &mut String, name: &str, tile: u64| {
        let _ = write!(
            s,
            "\n@compute @workgroup_size(256)\nfn {name}(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32) {{\n    let tile = tile_index(wg);\n    let start = tile * {tile}u;\n    // Whole workgroups past the end (the grid's last row): uniform exit.\n    if (start >= prm.n) {{ return; }}\n    let last = prm.n - 1u;\n    let base = start + t;\n"
        );
    };
    for (name, src) in [("apply_rademacher", "x"), ("perturbed_into", "src")] {
        head(&mut s, name, TILE);
        loads(&mut s, src, PER_THREAD);
        s.push_str(
            "    let bit = t % 32u;\n    let wi = t / 32u;\n    let tile_word = prm.word_base + tile * 512u;\n    for (var d = 0u; d < prm.n_dirs; d++) {\n        workgroupBarrier();\n        fill_tile_words(d, tile_word, t);\n        workgroupBarrier();\n        let sbits = dirs[d * 9u + 8u];\n",
        );
        for j in 0..PER_THREAD {
            // Element j·256 + t sits in word (j·256 + t) / 32 = 8j + t/32 at
            // bit t mod 32; bit 1 → +s, 0 → −s by flipping the sign bit, as
            // the CPU does.
            let _ = writeln!(
                s,
                "        a{j} = a{j} + bitcast<f32>(sbits ^ (((~(words[{}u + wi] >> bit)) & 1u) << 31u));",
                j * 8
            );
        }
        s.push_str("    }\n");
        stores(&mut s, PER_THREAD);
        s.push_str("}\n");
    }
    // Uniform: a tile of 4,096 elements is 256 blocks; thread t computes
    // block t into uwords[16t..16t+16].
    head(&mut s, "apply_uniform", UTILE);
    loads(&mut s, "x", U_PER_THREAD);
    s.push_str("    for (var d = 0u; d < prm.n_dirs; d++) {\n        workgroupBarrier();\n        let o = chacha8_block(d * 9u, (prm.elem_base + start) / 16u + t);\n");
    for k in 0..16 {
        let _ = writeln!(s, "        uwords[t * 16u + {k}u] = o[{k}];");
    }
    s.push_str("        workgroupBarrier();\n        let sc = bitcast<f32>(dirs[d * 9u + 8u]);\n");
    for j in 0..U_PER_THREAD {
        // v exact; the product is rounded on its own: the xor with the
        // always-zero guard keeps the compiler from fusing it into the add.
        let _ = writeln!(
            s,
            "        a{j} = a{j} + bitcast<f32>(bitcast<u32>(sc * (f32(i32(uwords[{}u + t] >> 8u) - 8388608) * (1.0 / 8388608.0))) ^ prm.guard);",
            j * 256
        );
    }
    s.push_str("    }\n");
    stores(&mut s, U_PER_THREAD);
    s.push_str("}\n");
    // The yardstick: a copy with the Rademacher kernels' access pattern.
    head(&mut s, "copy_kernel", TILE);
    loads(&mut s, "src", PER_THREAD);
    stores(&mut s, PER_THREAD);
    s.push_str("}\n");
    s
}

impl Kernels {
    pub(super) fn new(device: &wgpu::Device) -> Self {
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some("tally-prng"),
            source: wgpu::ShaderSource::Wgsl(shader_source().into()),
        });
        let pipeline = |entry: &str| {
            device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(entry),
                layout: None,
                module: &module,
                entry_point: Some(entry),
                compilation_options: wgpu::PipelineCompilationOptions::default(),
                cache: None,
            })
        };
        Kernels {
            apply_rademacher: pipeline("apply_rademacher"),
            perturbed_into: pipeline("perturbed_into"),
            apply_uniform: pipeline("apply_uniform"),
            stream_words: pipeline("stream_words"),
            copy: pipeline("copy_kernel"),
        }
    }
}

/// What [`Gpu::time_batched`] repeats.
#[derive(Clone, Copy, Debug)]
pub enum Batched<'a> {
    /// `copy_buffer_to_buffer` from `src`.
    DriverCopy {
        /// The source.
        src: &'a GpuVec,
    },
    /// The copy kernel from `src`.
    CopyKernel {
        /// The source.
        src: &'a GpuVec,
    },
    /// The fused Rademacher apply of `dirs`.
    Apply {
        /// The directions.
        dirs: &'a [(StreamId, f32)],
    },
}

/// A vector of f32 on the GPU.
#[derive(Debug)]
pub struct GpuVec {
    buf: wgpu::Buffer,
    len: usize,
}

impl GpuVec {
    /// Elements.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether it has no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The uniform block of the shader (`Params`), as bytes.
fn params_bytes(p: [u32; 8]) -> Vec<u8> {
    p.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn dirs_bytes(dirs: &[(StreamId, f32)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(dirs.len() * DIR_WORDS * 4);
    for (id, s) in dirs {
        out.extend_from_slice(&id.key());
        out.extend_from_slice(&s.to_bits().to_le_bytes());
    }
    out
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Op {
    Rademacher,
    Uniform,
    /// `x ← src` by a kernel (the benchmark's yardstick).
    Copy,
}

impl Gpu {
    fn storage_buffer(
        &self,
        what: &'static str,
        bytes: u64,
        extra: wgpu::BufferUsages,
    ) -> Result<wgpu::Buffer, GpuError> {
        let limit = self.device.limits().max_buffer_size;
        if bytes > limit {
            return Err(GpuError::TooLarge { what, bytes, limit });
        }
        Ok(self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(what),
            // wgpu refuses zero-sized bindings; an empty vector still gets 4 bytes.
            size: bytes.max(4).next_multiple_of(4),
            usage: wgpu::BufferUsages::STORAGE | extra,
            mapped_at_creation: false,
        }))
    }

    fn init_buffer(&self, what: &'static str, data: &[u8], usage: wgpu::BufferUsages) -> wgpu::Buffer {
        let buf = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(what),
            size: (data.len() as u64).max(16).next_multiple_of(16),
            usage: usage | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        self.queue.write_buffer(&buf, 0, data);
        buf
    }

    /// Copies `x` to a new GPU vector.
    pub fn upload(&self, x: &[f32]) -> Result<GpuVec, GpuError> {
        let v = self.zeros(x.len())?;
        self.write(&v, x)?;
        Ok(v)
    }

    /// A GPU vector of `len` zeros.
    pub fn zeros(&self, len: usize) -> Result<GpuVec, GpuError> {
        let buf = self.storage_buffer(
            "tally-vector",
            len as u64 * 4,
            wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
        )?;
        Ok(GpuVec { buf, len })
    }

    /// Overwrites `v` with `x` (same length).
    pub fn write(&self, v: &GpuVec, x: &[f32]) -> Result<(), GpuError> {
        if x.len() != v.len {
            return Err(GpuError::Device(format!("write of {} values into a vector of {}", x.len(), v.len)));
        }
        let bytes: Vec<u8> = x.iter().flat_map(|f| f.to_le_bytes()).collect();
        self.queue.write_buffer(&v.buf, 0, &bytes);
        Ok(())
    }

    /// Reads `v` back into `out` (same length).
    pub fn read_into(&self, v: &GpuVec, out: &mut [f32]) -> Result<(), GpuError> {
        if out.len() != v.len {
            return Err(GpuError::Device(format!("read of a vector of {} into {} values", v.len, out.len())));
        }
        let bytes = self.read_bytes(&v.buf, v.len as u64 * 4)?;
        for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
            *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
        Ok(())
    }

    /// Reads `v` back.
    pub fn download(&self, v: &GpuVec) -> Result<Vec<f32>, GpuError> {
        let mut out = vec![0f32; v.len];
        self.read_into(v, &mut out)?;
        Ok(out)
    }

    fn read_bytes(&self, buf: &wgpu::Buffer, bytes: u64) -> Result<Vec<u8>, GpuError> {
        if bytes == 0 {
            return Ok(Vec::new());
        }
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("tally-readback"),
            size: bytes,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut enc = self.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
        enc.copy_buffer_to_buffer(buf, 0, &staging, 0, bytes);
        self.queue.submit([enc.finish()]);
        let (tx, rx) = std::sync::mpsc::channel();
        staging.map_async(wgpu::MapMode::Read, .., move |r| {
            // The receiver lives until recv() below returns.
            let _ = tx.send(r);
        });
        self.wait()?;
        rx.recv()
            .map_err(|_| GpuError::Device("readback callback never ran".into()))?
            .map_err(|e| GpuError::Device(format!("readback: {e}")))?;
        let out = staging.get_mapped_range(..).map_err(|e| GpuError::Device(format!("readback: {e}")))?.to_vec();
        staging.unmap();
        Ok(out)
    }

    /// Blocks until all submitted work is done.
    pub fn wait(&self) -> Result<(), GpuError> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map(|_| ())
            .map_err(|e| GpuError::Device(format!("poll: {e}")))
    }

    /// Records the dispatches of `op` with `dirs` over `x` (and `src` for
    /// the perturbed copy) into `enc`, chunking by the binding limit.
    #[allow(clippy::too_many_arguments, reason = "the dispatch's inputs and the two caps the tests force")]
    fn encode(
        &self,
        enc: &mut wgpu::CommandEncoder,
        op: Op,
        x: &GpuVec,
        src: Option<&GpuVec>,
        dirs: &[(StreamId, f32)],
        max_groups: u64,
        max_chunk: u64,
    ) -> Result<(), GpuError> {
        if x.len == 0 || (dirs.is_empty() && op != Op::Copy) {
            return Ok(());
        }
        if x.len as u64 >= u64::from(u32::MAX) {
            return Err(GpuError::TooLarge { what: "vector", bytes: x.len as u64 * 4, limit: u64::from(u32::MAX) * 4 });
        }
        let pipeline = match (op, src.is_some()) {
            (Op::Rademacher, false) => &self.kernels.apply_rademacher,
            (Op::Rademacher, true) => &self.kernels.perturbed_into,
            (Op::Uniform, _) => &self.kernels.apply_uniform,
            (Op::Copy, _) => &self.kernels.copy,
        };
        let tile = if op == Op::Uniform { UTILE } else { TILE };
        // Whole tiles per chunk, so every chunk starts on a tile (and so a
        // word and a block) boundary and its byte offset is 64 KiB-aligned.
        let max_binding = self.device.limits().max_storage_buffer_binding_size;
        let chunk_elems = ((max_binding / 4).min(max_chunk) / TILE).max(1) * TILE;
        let layout = pipeline.get_bind_group_layout(0);
        // The copy takes no directions: one empty batch runs it once.
        let batches: Vec<&[(StreamId, f32)]> =
            if op == Op::Copy { vec![&[]] } else { dirs.chunks(DIRS_PER_DISPATCH).collect() };
        for batch in batches {
            let dbuf = (!batch.is_empty())
                .then(|| self.init_buffer("tally-dirs", &dirs_bytes(batch), wgpu::BufferUsages::STORAGE));
            let mut start = 0u64;
            while start < x.len as u64 {
                let n = chunk_elems.min(x.len as u64 - start);
                let tiles = n.div_ceil(tile);
                let gx = tiles.min(max_groups);
                let gy = tiles.div_ceil(gx);
                let p = params_bytes([
                    n as u32,
                    batch.len() as u32,
                    (start / 32) as u32,
                    gx as u32,
                    0, // guard: must stay 0 (see the shader)
                    start as u32,
                    0,
                    0,
                ]);
                let pbuf = self.init_buffer("tally-params", &p, wgpu::BufferUsages::UNIFORM);
                fn range(b: &wgpu::Buffer, start: u64, n: u64) -> wgpu::BufferBinding<'_> {
                    wgpu::BufferBinding { buffer: b, offset: start * 4, size: std::num::NonZeroU64::new(n * 4) }
                }
                let mut entries = vec![
                    wgpu::BindGroupEntry {
                        binding: 0,
                        resource: wgpu::BindingResource::Buffer(range(&x.buf, start, n)),
                    },
                    wgpu::BindGroupEntry { binding: 2, resource: pbuf.as_entire_binding() },
                ];
                if let Some(d) = &dbuf {
                    entries.push(wgpu::BindGroupEntry { binding: 1, resource: d.as_entire_binding() });
                }
                if let Some(s) = src {
                    entries.push(wgpu::BindGroupEntry {
                        binding: 3,
                        resource: wgpu::BindingResource::Buffer(range(&s.buf, start, n)),
                    });
                }
                let bg = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
                    label: None,
                    layout: &layout,
                    entries: &entries,
                });
                let mut pass =
                    enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: None, timestamp_writes: None });
                pass.set_pipeline(pipeline);
                pass.set_bind_group(0, &bg, &[]);
                pass.dispatch_workgroups(gx as u32, gy as u32, 1);
                drop(pass);
                start += n;
            }
        }
        Ok(())
    }

    fn run(&self, op: Op, x: &GpuVec, src: Option<&GpuVec>, dirs: &[(StreamId, f32)]) -> Result<(), GpuError> {
        self.run_with(op, x, src, dirs, MAX_GROUPS_PER_DIM, u64::MAX)
    }

    /// [`Gpu::run`] with the grid's row width and the chunk size capped
    /// (tests force the multi-row and multi-chunk paths with them).
    pub(super) fn run_with(
        &self,
        op: Op,
        x: &GpuVec,
        src: Option<&GpuVec>,
        dirs: &[(StreamId, f32)],
        max_groups: u64,
        max_chunk: u64,
    ) -> Result<(), GpuError> {
        if let Some(s) = src
            && s.len != x.len
        {
            return Err(GpuError::Device(format!("source of {} values for a vector of {}", s.len, x.len)));
        }
        let mut enc = self.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
        self.encode(&mut enc, op, x, src, dirs, max_groups.clamp(1, MAX_GROUPS_PER_DIM), max_chunk)?;
        self.queue.submit([enc.finish()]);
        Ok(())
    }

    /// `x ← x + Σₖ sₖ·z(idₖ)` on the GPU, bit for bit
    /// [`tally_protocol::prng::apply_rademacher`]. Asynchronous: the next
    /// read or [`Gpu::wait`] sees the result.
    pub fn apply_rademacher_on(&self, x: &GpuVec, dirs: &[(StreamId, f32)]) -> Result<(), GpuError> {
        self.run(Op::Rademacher, x, None, dirs)
    }

    /// `dst ← src + s·z(id)` on the GPU, bit for bit
    /// [`tally_protocol::prng::perturbed_into`] (src read once, z never stored).
    pub fn perturbed_into_on(&self, dst: &GpuVec, src: &GpuVec, id: &StreamId, scale: f32) -> Result<(), GpuError> {
        self.run(Op::Rademacher, dst, Some(src), &[(*id, scale)])
    }

    /// `x ← x + Σₖ sₖ·v(idₖ)` (uniform directions) on the GPU, bit for bit
    /// [`tally_protocol::prng::apply_uniform`].
    pub fn apply_uniform_on(&self, x: &GpuVec, dirs: &[(StreamId, f32)]) -> Result<(), GpuError> {
        self.run(Op::Uniform, x, None, dirs)
    }

    /// Uploads `x`, applies `dirs` (Rademacher), reads it back.
    pub fn apply_rademacher(&self, x: &mut [f32], dirs: &[(StreamId, f32)]) -> Result<(), GpuError> {
        let v = self.upload(x)?;
        self.apply_rademacher_on(&v, dirs)?;
        self.read_into(&v, x)
    }

    /// Uploads `x`, applies `dirs` (uniform), reads it back.
    pub fn apply_uniform(&self, x: &mut [f32], dirs: &[(StreamId, f32)]) -> Result<(), GpuError> {
        let v = self.upload(x)?;
        self.apply_uniform_on(&v, dirs)?;
        self.read_into(&v, x)
    }

    /// Words `first..first + n` of stream `id`, computed on the GPU.
    pub fn stream_words(&self, id: &StreamId, first: u32, n: u32) -> Result<Vec<u32>, GpuError> {
        let out = self.storage_buffer("tally-words", u64::from(n) * 4, wgpu::BufferUsages::COPY_SRC)?;
        let dbuf = self.init_buffer("tally-dirs", &dirs_bytes(&[(*id, 0.0)]), wgpu::BufferUsages::STORAGE);
        let groups = u64::from(n).div_ceil(256);
        if groups > MAX_GROUPS_PER_DIM {
            return Err(GpuError::TooLarge {
                what: "word request",
                bytes: u64::from(n) * 4,
                limit: MAX_GROUPS_PER_DIM * 1024,
            });
        }
        let pbuf =
            self.init_buffer("tally-params", &params_bytes([n, 1, 0, 0, 0, 0, first, 0]), wgpu::BufferUsages::UNIFORM);
        let pipeline = &self.kernels.stream_words;
        let bg = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &pipeline.get_bind_group_layout(0),
            entries: &[
                wgpu::BindGroupEntry { binding: 1, resource: dbuf.as_entire_binding() },
                wgpu::BindGroupEntry { binding: 2, resource: pbuf.as_entire_binding() },
                wgpu::BindGroupEntry { binding: 4, resource: out.as_entire_binding() },
            ],
        });
        let mut enc = self.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
        {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: None, timestamp_writes: None });
            pass.set_pipeline(pipeline);
            pass.set_bind_group(0, &bg, &[]);
            pass.dispatch_workgroups(groups.max(1) as u32, 1, 1);
        }
        self.queue.submit([enc.finish()]);
        let bytes = self.read_bytes(&out, u64::from(n) * 4)?;
        Ok(bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }

    /// Seconds the GPU takes for `reps` back-to-back runs of `what` on `x`,
    /// recorded into one command buffer and submitted once: the kernel's
    /// throughput without per-call submission costs (the benchmark's
    /// batched figures).
    pub fn time_batched(&self, what: Batched<'_>, x: &GpuVec, reps: u32) -> Result<f64, GpuError> {
        let mut enc = self.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
        for _ in 0..reps {
            match what {
                Batched::DriverCopy { src } => enc.copy_buffer_to_buffer(&src.buf, 0, &x.buf, 0, x.len as u64 * 4),
                Batched::CopyKernel { src } => {
                    self.encode(&mut enc, Op::Copy, x, Some(src), &[], MAX_GROUPS_PER_DIM, u64::MAX)?;
                }
                Batched::Apply { dirs } => {
                    self.encode(&mut enc, Op::Rademacher, x, None, dirs, MAX_GROUPS_PER_DIM, u64::MAX)?;
                }
            }
        }
        let cmd = enc.finish();
        self.wait()?;
        let t = std::time::Instant::now();
        self.queue.submit([cmd]);
        self.wait()?;
        Ok(t.elapsed().as_secs_f64())
    }

    /// `dst ← src` by a kernel with the fused kernels' access pattern (the
    /// benchmark's second yardstick), asynchronous.
    pub fn copy_kernel(&self, dst: &GpuVec, src: &GpuVec) -> Result<(), GpuError> {
        self.run(Op::Copy, dst, Some(src), &[])
    }

    /// Device-to-device copy of `src` into `dst` (`copy_buffer_to_buffer`:
    /// the driver's copy, the benchmark's yardstick), asynchronous.
    pub fn copy(&self, dst: &GpuVec, src: &GpuVec) -> Result<(), GpuError> {
        if src.len != dst.len {
            return Err(GpuError::Device(format!("copy of {} values into {}", src.len, dst.len)));
        }
        let mut enc = self.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
        enc.copy_buffer_to_buffer(&src.buf, 0, &dst.buf, 0, src.len as u64 * 4);
        self.queue.submit([enc.finish()]);
        Ok(())
    }
}

/// Applies replicated rounds on the GPU ([`DirectionApplier`]). If the GPU
/// fails, the round is applied on the CPU instead (same bits by
/// construction) and the failure is counted, so a flaky device slows a client
/// down but never desynchronises its replica.
#[derive(Debug)]
pub struct GpuApplier {
    gpu: Arc<Gpu>,
    fallbacks: AtomicU64,
}

impl GpuApplier {
    /// An applier on `gpu`.
    pub fn new(gpu: Arc<Gpu>) -> Self {
        GpuApplier { gpu, fallbacks: AtomicU64::new(0) }
    }
}

impl DirectionApplier for GpuApplier {
    fn apply_rademacher(&self, x: &mut [f32], directions: &[(StreamId, f32)]) {
        // `x` is written only once the whole readback arrived, so a failure
        // at any step leaves it untouched for the CPU fallback.
        match self.gpu.apply_rademacher(x, directions) {
            Ok(()) => {}
            Err(_) => {
                self.fallbacks.fetch_add(1, Ordering::Relaxed);
                tally_protocol::prng::apply_rademacher(x, directions);
            }
        }
    }
    /// Ferret's bases (uniform directions), with the same fallback.
    fn apply_uniform(&self, x: &mut [f32], directions: &[(StreamId, f32)]) {
        match self.gpu.apply_uniform(x, directions) {
            Ok(()) => {}
            Err(_) => {
                self.fallbacks.fetch_add(1, Ordering::Relaxed);
                tally_protocol::prng::apply_uniform(x, directions);
            }
        }
    }
    fn name(&self) -> String {
        format!("gpu: {}", self.gpu.adapter())
    }
    fn fallbacks(&self) -> u64 {
        self.fallbacks.load(Ordering::Relaxed)
    }
}
