// Tally's shared randomness on the GPU: the ChaCha8 stream of
// tally_protocol::prng, regenerated per tile in workgroup memory and applied
// to parameters in the same pass (z is never written to memory).
//
// Bit-exactness with the CPU code (tally_protocol::prng):
// - ChaCha is integer arithmetic (u32 wrapping add, xor, rotate): exact.
// - Rademacher: x + (±s) where ±s is s with its sign bit set from the stream
//   bit (bitcast, as the CPU does): one f32 addition, correctly rounded on
//   Vulkan, Metal and DX12. No product, so nothing for a compiler to fuse.
// - Uniform: p = s * v then x + p. The product is passed through an xor with
//   `guard` (a runtime uniform that is always 0) between the multiply and the
//   add: the compiler cannot prove it is zero, so it cannot contract the two
//   into a fused multiply-add, whose single rounding would give other bits.
//
// Layout: a workgroup of 256 threads owns a tile of TILE = 16384 elements
// (Rademacher: 512 words = 32 ChaCha blocks) and keeps them in registers,
// 64 per thread, element tile_start + j*256 + t for thread t. Every
// direction's words are regenerated into workgroup memory (8 threads per
// block, each computing the whole block and keeping two of its words: the
// redundancy keeps all 256 threads busy and costs < 13 integer ops per
// element), then applied; each element is read once and written once
// whatever the number of directions.

const WG: u32 = 256u;
const PER_THREAD: u32 = 64u;
const TILE: u32 = 16384u;        // WG * PER_THREAD
const TILE_WORDS: u32 = 512u;    // TILE / 32
const UTILE: u32 = 4096u;        // uniform kernel: 16 elements per thread, one word each

struct Params {
    // Elements in this dispatch's binding (x and src start at element
    // `word_base * 32` of the stream for Rademacher, `elem_base` for uniform).
    n: u32,
    n_dirs: u32,
    // Stream word index of element 0 of the binding (Rademacher).
    word_base: u32,
    // Workgroups per row of the 2-D dispatch grid (65,535 at most per dimension).
    groups_x: u32,
    // Always 0; see the header (uniform kernel).
    guard: u32,
    // Stream word (= element) index of element 0 of the binding (uniform).
    elem_base: u32,
    // words kernel: first word and word count.
    first_word: u32,
    pad: u32,
}

@group(0) @binding(0) var<storage, read_write> x: array<f32>;
@group(0) @binding(1) var<storage, read> dirs: array<u32>;     // per direction: key[8], scale bits
@group(0) @binding(2) var<uniform> prm: Params;
@group(0) @binding(3) var<storage, read> src: array<f32>;
@group(0) @binding(4) var<storage, read_write> out_words: array<u32>;

var<workgroup> words: array<u32, 4096>;

fn rotl(v: u32, n: u32) -> u32 {
    return (v << n) | (v >> (32u - n));
}

// Word `w` (0..16) of ChaCha8 block `counter` of the stream whose key is
// dirs[key_at..key_at+8], nonce 0, 64-bit block counter in words 12-13
// (rand_chacha's layout). Returns all 16 words through `out`.
fn chacha8_block(key_at: u32, counter: u32) -> array<u32, 16> {
    var s: array<u32, 16>;
    s[0] = 0x61707865u; s[1] = 0x3320646eu; s[2] = 0x79622d32u; s[3] = 0x6b206574u;
    for (var i = 0u; i < 8u; i++) { s[4u + i] = dirs[key_at + i]; }
    s[12] = counter; s[13] = 0u; s[14] = 0u; s[15] = 0u;
    var a0 = s[0]; var a1 = s[1]; var a2 = s[2]; var a3 = s[3];
    var a4 = s[4]; var a5 = s[5]; var a6 = s[6]; var a7 = s[7];
    var a8 = s[8]; var a9 = s[9]; var a10 = s[10]; var a11 = s[11];
    var a12 = s[12]; var a13 = s[13]; var a14 = s[14]; var a15 = s[15];
    for (var r = 0u; r < 4u; r++) {
        // Column round.
        a0 += a4; a12 = rotl(a12 ^ a0, 16u); a8 += a12; a4 = rotl(a4 ^ a8, 12u);
        a0 += a4; a12 = rotl(a12 ^ a0, 8u); a8 += a12; a4 = rotl(a4 ^ a8, 7u);
        a1 += a5; a13 = rotl(a13 ^ a1, 16u); a9 += a13; a5 = rotl(a5 ^ a9, 12u);
        a1 += a5; a13 = rotl(a13 ^ a1, 8u); a9 += a13; a5 = rotl(a5 ^ a9, 7u);
        a2 += a6; a14 = rotl(a14 ^ a2, 16u); a10 += a14; a6 = rotl(a6 ^ a10, 12u);
        a2 += a6; a14 = rotl(a14 ^ a2, 8u); a10 += a14; a6 = rotl(a6 ^ a10, 7u);
        a3 += a7; a15 = rotl(a15 ^ a3, 16u); a11 += a15; a7 = rotl(a7 ^ a11, 12u);
        a3 += a7; a15 = rotl(a15 ^ a3, 8u); a11 += a15; a7 = rotl(a7 ^ a11, 7u);
        // Diagonal round.
        a0 += a5; a15 = rotl(a15 ^ a0, 16u); a10 += a15; a5 = rotl(a5 ^ a10, 12u);
        a0 += a5; a15 = rotl(a15 ^ a0, 8u); a10 += a15; a5 = rotl(a5 ^ a10, 7u);
        a1 += a6; a12 = rotl(a12 ^ a1, 16u); a11 += a12; a6 = rotl(a6 ^ a11, 12u);
        a1 += a6; a12 = rotl(a12 ^ a1, 8u); a11 += a12; a6 = rotl(a6 ^ a11, 7u);
        a2 += a7; a13 = rotl(a13 ^ a2, 16u); a8 += a13; a7 = rotl(a7 ^ a8, 12u);
        a2 += a7; a13 = rotl(a13 ^ a2, 8u); a8 += a13; a7 = rotl(a7 ^ a8, 7u);
        a3 += a4; a14 = rotl(a14 ^ a3, 16u); a9 += a14; a4 = rotl(a4 ^ a9, 12u);
        a3 += a4; a14 = rotl(a14 ^ a3, 8u); a9 += a14; a4 = rotl(a4 ^ a9, 7u);
    }
    var o: array<u32, 16>;
    o[0] = a0 + s[0]; o[1] = a1 + s[1]; o[2] = a2 + s[2]; o[3] = a3 + s[3];
    o[4] = a4 + s[4]; o[5] = a5 + s[5]; o[6] = a6 + s[6]; o[7] = a7 + s[7];
    o[8] = a8 + s[8]; o[9] = a9 + s[9]; o[10] = a10 + s[10]; o[11] = a11 + s[11];
    o[12] = a12 + s[12]; o[13] = a13 + s[13]; o[14] = a14 + s[14]; o[15] = a15 + s[15];
    return o;
}

fn tile_index(wg: vec3<u32>) -> u32 {
    return wg.x + wg.y * prm.groups_x;
}

// Regenerates the 512 words of direction `d` for the tile starting at stream
// word `tile_word` into words[0..512].
fn fill_tile_words(d: u32, tile_word: u32, t: u32) {
    let block = tile_word / 16u + t / 8u;
    let o = chacha8_block(d * 9u, block);
    let k = (t % 8u) * 2u;
    words[(t / 8u) * 16u + k] = o[k];
    words[(t / 8u) * 16u + k + 1u] = o[k + 1u];
}

fn apply_dirs(acc: ptr<function, array<f32, 64>>, tile_word: u32, t: u32) {
    let bit = t % 32u;
    for (var d = 0u; d < prm.n_dirs; d++) {
        workgroupBarrier();
        fill_tile_words(d, tile_word, t);
        workgroupBarrier();
        let sbits = dirs[d * 9u + 8u];
        for (var j = 0u; j < PER_THREAD; j++) {
            let w = words[j * 8u + t / 32u];
            // bit 1 → +s, bit 0 → −s: flip the sign bit, exactly as the CPU.
            let neg = ((~(w >> bit)) & 1u) << 31u;
            (*acc)[j] = (*acc)[j] + bitcast<f32>(sbits ^ neg);
        }
    }
}

// x ← x + Σ_d s_d · z_d (Rademacher), in place.
@compute @workgroup_size(256)
fn apply_rademacher(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let tile = tile_index(wg);
    let start = tile * TILE;
    // Whole workgroups past the end (the last row of the grid): uniform exit.
    if (start >= prm.n) { return; }
    var acc: array<f32, 64>;
    for (var j = 0u; j < PER_THREAD; j++) {
        let e = start + j * WG + t;
        if (e < prm.n) { acc[j] = x[e]; } else { acc[j] = 0.0; }
    }
    apply_dirs(&acc, prm.word_base + tile * TILE_WORDS, t);
    for (var j = 0u; j < PER_THREAD; j++) {
        let e = start + j * WG + t;
        if (e < prm.n) { x[e] = acc[j]; }
    }
}

// x ← src + Σ_d s_d · z_d (Rademacher): the perturbed copy for evaluating
// a loss at θ ± εz, reading θ once.
@compute @workgroup_size(256)
fn perturbed_into(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let tile = tile_index(wg);
    let start = tile * TILE;
    // Whole workgroups past the end (the last row of the grid): uniform exit.
    if (start >= prm.n) { return; }
    var acc: array<f32, 64>;
    for (var j = 0u; j < PER_THREAD; j++) {
        let e = start + j * WG + t;
        if (e < prm.n) { acc[j] = src[e]; } else { acc[j] = 0.0; }
    }
    apply_dirs(&acc, prm.word_base + tile * TILE_WORDS, t);
    for (var j = 0u; j < PER_THREAD; j++) {
        let e = start + j * WG + t;
        if (e < prm.n) { x[e] = acc[j]; }
    }
}

// x ← x + Σ_d s_d · v_d, v = (w >> 8)·2⁻²³ − 1 (one word per element).
// A tile is 4096 elements = 256 blocks: each thread computes one block.
@compute @workgroup_size(256)
fn apply_uniform(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let tile = tile_index(wg);
    let start = tile * UTILE;
    if (start >= prm.n) { return; }
    var acc: array<f32, 16>;
    for (var j = 0u; j < 16u; j++) {
        let e = start + j * WG + t;
        if (e < prm.n) { acc[j] = x[e]; } else { acc[j] = 0.0; }
    }
    for (var d = 0u; d < prm.n_dirs; d++) {
        workgroupBarrier();
        let o = chacha8_block(d * 9u, (prm.elem_base + start) / 16u + t);
        for (var k = 0u; k < 16u; k++) { words[t * 16u + k] = o[k]; }
        workgroupBarrier();
        let s = bitcast<f32>(dirs[d * 9u + 8u]);
        for (var j = 0u; j < 16u; j++) {
            let w = words[j * WG + t];
            let v = f32(i32(w >> 8u) - 8388608) * (1.0 / 8388608.0);
            let p = bitcast<f32>(bitcast<u32>(s * v) ^ prm.guard);
            acc[j] = acc[j] + p;
        }
    }
    for (var j = 0u; j < 16u; j++) {
        let e = start + j * WG + t;
        if (e < prm.n) { x[e] = acc[j]; }
    }
}

// out_words[i] ← word first_word + i of direction 0's stream: the raw
// keystream, for the golden vectors.
@compute @workgroup_size(256)
fn stream_words(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    if (i >= prm.n) { return; }
    let w = prm.first_word + i;
    let o = chacha8_block(0u, w / 16u);
    out_words[i] = o[w % 16u];
}
