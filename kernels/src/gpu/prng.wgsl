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

// Tiles: 256 threads × 64 elements = 16,384 (Rademacher; 512 words), and
// 256 × 16 = 4,096 (uniform; one word each). prng.rs holds the constants.

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

var<workgroup> words: array<u32, 512>;
var<workgroup> uwords: array<u32, 4096>;

fn rotl(v: u32, n: u32) -> u32 {
    return (v << n) | (v >> (32u - n));
}

// ChaCha8 block `counter` of the stream whose key is dirs[key_at..key_at+8],
// nonce 0, 64-bit block counter in words 12-13 (rand_chacha's layout; the
// high half is 0: 2^32 blocks are 2^41 Rademacher elements). Scalars only,
// and callers index the result with constants, so it stays in registers.
fn chacha8_block(key_at: u32, counter: u32) -> array<u32, 16> {
    let k0 = dirs[key_at]; let k1 = dirs[key_at + 1u]; let k2 = dirs[key_at + 2u]; let k3 = dirs[key_at + 3u];
    let k4 = dirs[key_at + 4u]; let k5 = dirs[key_at + 5u]; let k6 = dirs[key_at + 6u]; let k7 = dirs[key_at + 7u];
    var a0 = 0x61707865u; var a1 = 0x3320646eu; var a2 = 0x79622d32u; var a3 = 0x6b206574u;
    var a4 = k0; var a5 = k1; var a6 = k2; var a7 = k3;
    var a8 = k4; var a9 = k5; var a10 = k6; var a11 = k7;
    var a12 = counter; var a13 = 0u; var a14 = 0u; var a15 = 0u;
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
    return array<u32, 16>(
        a0 + 0x61707865u, a1 + 0x3320646eu, a2 + 0x79622d32u, a3 + 0x6b206574u,
        a4 + k0, a5 + k1, a6 + k2, a7 + k3, a8 + k4, a9 + k5, a10 + k6, a11 + k7,
        a12 + counter, a13, a14, a15);
}

fn tile_index(wg: vec3<u32>) -> u32 {
    return wg.x + wg.y * prm.groups_x;
}

// Regenerates the 512 words of direction `d` for the tile starting at stream
// word `tile_word` into words[0..512]: thread t computes block t / 8 and
// keeps words 2·(t mod 8) and 2·(t mod 8) + 1 (constant indices, so the
// block stays in registers).
fn fill_tile_words(d: u32, tile_word: u32, t: u32) {
    let o = chacha8_block(d * 9u, tile_word / 16u + t / 8u);
    let b = (t / 8u) * 16u;
    switch (t % 8u) {
        case 0u: { words[b + 0u] = o[0]; words[b + 1u] = o[1]; }
        case 1u: { words[b + 2u] = o[2]; words[b + 3u] = o[3]; }
        case 2u: { words[b + 4u] = o[4]; words[b + 5u] = o[5]; }
        case 3u: { words[b + 6u] = o[6]; words[b + 7u] = o[7]; }
        case 4u: { words[b + 8u] = o[8]; words[b + 9u] = o[9]; }
        case 5u: { words[b + 10u] = o[10]; words[b + 11u] = o[11]; }
        case 6u: { words[b + 12u] = o[12]; words[b + 13u] = o[13]; }
        case 7u: { words[b + 14u] = o[14]; words[b + 15u] = o[15]; }
        default: {}
    }
}

// The kernels (apply_rademacher, perturbed_into, apply_uniform, copy_kernel)
// are appended by prng.rs with their per-element statements written out:
// WGSL has no unroll directive, and the same kernels written as loops over a
// per-thread array ran at 0.5-0.6 TB/s on an H200 (probably the array left
// in local memory, one load in flight per thread); with 64 named values
// every load is issued at once and they run at 2.9-3.1 TB/s at 100M.

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
