// GPU-resident pre- and post-processing of the segmentation pipeline (node/infer/gpu/resident.py).
//
// Every kernel mirrors one numpy function of node/infer, named in its comment, and is tested against
// it twice: compiled with g++ through tests/harness/cuda_cpu/cuda_cpu.h, a header that runs a launch
// as a serial loop over grid x block (tests/unit/test_gpu_kernels.py, every CI run), and loaded with
// pycuda on a GPU (tests/gpu). Hence the rules for this file:
//   - no shared memory, __syncthreads, warp intrinsics or atomics: every output element is written by
//     exactly one thread (overlapping tiles are accumulated one tile per launch, in stream order);
//   - float arithmetic through __fadd_rn/__fsub_rn/__fmul_rn/__fdiv_rn (and __d*_rn for the float64
//     grid coordinates), so nvcc cannot contract a*b+c into an FMA: each result is bitwise the one of
//     numpy's float32 (float64) operations, in numpy's order;
//   - indices are 64-bit (idx_t): a native CT may be 2000 x 1024 x 1024 voxels, more than 2^31;
//   - grid-stride loops: any grid size covers any element count;
//   - no #include: the same text compiles with nvcc, with pycuda's SourceModule (no_extern_c=True)
//     and with g++ after the shim header.
//
// Regenerate the shipped PTX (loaded when nvcc is not installed) after editing this file:
//   nvcc --ptx -arch=compute_75 -o node/infer/gpu/kernels.ptx node/infer/gpu/kernels.cu
// tests/unit/test_gpu_kernels.py checks that it is current whenever the local nvcc is the version
// recorded in its header.

typedef long long idx_t;

#define FOR_EACH(i, n) \
    for (idx_t i = (idx_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (idx_t)blockDim.x * gridDim.x)

// ---------------------------------------------------------------------------------------- helpers

// One axis of linear interpolation: value = v[lo] + (v[lo + step] - v[lo]) * w. step 0 is an axis
// numpy does not interpolate (same grid: skipped; one input voxel: np.repeat).
struct Tap {
    idx_t lo;
    idx_t step;
    float w;
};

__device__ __forceinline__ Tap make_tap(idx_t lo, idx_t step, float w) {
    Tap t;
    t.lo = lo;
    t.step = step;
    t.w = w;
    return t;
}

// transforms._corner_weights (+ resample_linear's skipped and repeated axes): end voxel centres
// aligned, x = i * (n_in - 1) / (n_out - 1) in float64, lower neighbour clamped to n_in - 2.
__device__ __forceinline__ Tap aligned_tap(idx_t i, idx_t n_in, idx_t n_out) {
    if (n_in == n_out) return make_tap(i, 0, 0.0f);  // resample_linear: axis skipped
    if (n_in == 1) return make_tap(0, 0, 0.0f);      // np.repeat
    if (n_out == 1) return make_tap(0, 1, 0.0f);     // _corner_weights: lo 0, weight 0
    double x = __ddiv_rn(__dmul_rn((double)i, (double)(n_in - 1)), (double)(n_out - 1));
    idx_t lo = (idx_t)floor(x);
    if (lo > n_in - 2) lo = n_in - 2;
    return make_tap(lo, 1, __double2float_rn(__dsub_rn(x, (double)lo)));
}

// transforms._centred_weights (+ resample_centred's skipped axes and _lerp_axis's np.repeat): grids
// edge-aligned, x = clip((i + 0.5) * ratio - 0.5, 0, n_in - 1) in float64, lower neighbour clamped.
__device__ __forceinline__ Tap centred_tap(idx_t i, idx_t n_in, idx_t n_out, double ratio) {
    if (n_in == n_out && ratio == 1.0) return make_tap(i, 0, 0.0f);  // same grid: axis skipped
    if (n_in == 1) return make_tap(0, 0, 0.0f);                      // np.repeat
    double x = __dsub_rn(__dmul_rn(__dadd_rn((double)i, 0.5), ratio), 0.5);
    x = fmin(fmax(x, 0.0), (double)(n_in - 1));
    idx_t lo = (idx_t)floor(x);
    if (lo > n_in - 2) lo = n_in - 2;
    return make_tap(lo, 1, __double2float_rn(__dsub_rn(x, (double)lo)));
}

// transforms._blend: low + (high - low) * w, each step rounded to float32.
__device__ __forceinline__ float lerp(float a, float b, float w) {
    return __fadd_rn(a, __fmul_rn(__fsub_rn(b, a), w));
}

__device__ __forceinline__ Tap pick_tap(int axis, Tap z, Tap y, Tap x) {
    return axis == 0 ? z : (axis == 1 ? y : x);
}

__device__ __forceinline__ idx_t pick_stride(int axis, idx_t plane, idx_t row) {
    return axis == 0 ? plane : (axis == 1 ? row : 1);
}

// Trilinear interpolation of sample(flat index) over an (., H, W) grid, computed as numpy's separable
// resampling computes it: the four lerps along axis a0 first (the axis numpy resamples first, the most
// shrinking), then two along a1, then one along a2. Each intermediate value is exactly the value the
// separable pass stores, so the result is bitwise numpy's.
template <class Sample>
__device__ __forceinline__ float trilinear(const Sample& sample, idx_t H, idx_t W, Tap tz, Tap ty, Tap tx,
                                           int a0, int a1, int a2) {
    const idx_t plane = H * W;
    const Tap t0 = pick_tap(a0, tz, ty, tx), t1 = pick_tap(a1, tz, ty, tx), t2 = pick_tap(a2, tz, ty, tx);
    const idx_t s0 = t0.step * pick_stride(a0, plane, W);
    const idx_t s1 = t1.step * pick_stride(a1, plane, W);
    const idx_t s2 = t2.step * pick_stride(a2, plane, W);
    const idx_t base = tz.lo * plane + ty.lo * W + tx.lo;
    const float v00 = lerp(sample(base), sample(base + s0), t0.w);
    const float v10 = lerp(sample(base + s1), sample(base + s1 + s0), t0.w);
    const float v01 = lerp(sample(base + s2), sample(base + s2 + s0), t0.w);
    const float v11 = lerp(sample(base + s1 + s2), sample(base + s1 + s2 + s0), t0.w);
    return lerp(lerp(v00, v10, t1.w), lerp(v01, v11, t1.w), t2.w);
}

// transforms.normalise on one value: (clip(x, lo, hi) + offset) * scale in float32; NaN stays NaN
// and lo > hi gives hi, as np.clip (= minimum(maximum(x, lo), hi)).
__device__ __forceinline__ float normalise_value(float x, float clip_lo, float clip_hi, float offset, float scale) {
    float c = x < clip_lo ? clip_lo : x;
    c = c > clip_hi ? clip_hi : c;
    return __fmul_rn(__fadd_rn(c, offset), scale);
}

template <class T>
struct Load {
    const T* p;
    __device__ __forceinline__ float operator()(idx_t i) const { return (float)p[i]; }
};

// sliding_window's ``acc /= norm`` on the fly: channel k of the accumulated probabilities, divided by
// the accumulated weights when norm is given (a null norm: the probabilities are already averaged).
struct Probability {
    const float* acc;
    const float* norm;
    idx_t n;
    idx_t k;
    __device__ __forceinline__ float operator()(idx_t i) const {
        const float a = acc[k * n + i];
        return norm ? __fdiv_rn(a, norm[i]) : a;
    }
};

// labels_on_native_grid's two-class rule: probabilities[1] - probabilities[0], per model-grid voxel.
struct Difference {
    const float* acc;
    const float* norm;
    idx_t n;
    __device__ __forceinline__ float operator()(idx_t i) const {
        float p0 = acc[i], p1 = acc[n + i];
        if (norm) {
            p0 = __fdiv_rn(p0, norm[i]);
            p1 = __fdiv_rn(p1, norm[i]);
        }
        return __fsub_rn(p1, p0);
    }
};

// Flat index i of a (., h, w) array -> (z, y, x).
__device__ __forceinline__ void unravel(idx_t i, idx_t h, idx_t w, idx_t& z, idx_t& y, idx_t& x) {
    const idx_t plane = h * w;
    z = i / plane;
    const idx_t r = i - z * plane;
    y = r / w;
    x = r - y * w;
}

// -------------------------------------------------------------------------------------- resampling

// One output voxel of a (d, h, w) resampling of a (di, hi, wi) volume, optionally normalised.
// centred != 0: resample_centred (ratios rz, ry, rx = target / spacing); else resample_linear.
template <class T>
__device__ __forceinline__ void resample(const T* __restrict__ src, float* __restrict__ dst,
                                         idx_t di, idx_t hi, idx_t wi, idx_t d, idx_t h, idx_t w,
                                         int centred, double rz, double ry, double rx, int a0, int a1, int a2,
                                         int normalise, float clip_lo, float clip_hi, float offset, float scale) {
    Load<T> load;
    load.p = src;
    FOR_EACH(i, d * h * w) {
        idx_t z, y, x;
        unravel(i, h, w, z, y, x);
        const Tap tz = centred ? centred_tap(z, di, d, rz) : aligned_tap(z, di, d);
        const Tap ty = centred ? centred_tap(y, hi, h, ry) : aligned_tap(y, hi, h);
        const Tap tx = centred ? centred_tap(x, wi, w, rx) : aligned_tap(x, wi, w);
        float v = trilinear(load, hi, wi, tz, ty, tx, a0, a1, a2);
        if (normalise) v = normalise_value(v, clip_lo, clip_hi, offset, scale);
        dst[i] = v;
    }
}

// transforms.resample_linear (int16 source), fused with transforms.normalise when normalise != 0
// (to_model_grid's order: resample, then normalise on the smaller grid). (a0, a1, a2): numpy's axis
// order, sorted(range(3), key=out_shape[a] / in_shape[a]).
extern "C" __global__ void resample_aligned_i16(const short* __restrict__ src, float* __restrict__ dst,
                                                idx_t di, idx_t hi, idx_t wi, idx_t d, idx_t h, idx_t w,
                                                int a0, int a1, int a2, int normalise, float clip_lo,
                                                float clip_hi, float offset, float scale) {
    resample(src, dst, di, hi, wi, d, h, w, 0, 1.0, 1.0, 1.0, a0, a1, a2, normalise, clip_lo, clip_hi, offset, scale);
}

// transforms.resample_linear (float32 source), optionally fused with transforms.normalise.
extern "C" __global__ void resample_aligned_f32(const float* __restrict__ src, float* __restrict__ dst,
                                                idx_t di, idx_t hi, idx_t wi, idx_t d, idx_t h, idx_t w,
                                                int a0, int a1, int a2, int normalise, float clip_lo,
                                                float clip_hi, float offset, float scale) {
    resample(src, dst, di, hi, wi, d, h, w, 0, 1.0, 1.0, 1.0, a0, a1, a2, normalise, clip_lo, clip_hi, offset, scale);
}

// transforms.resample_centred (int16 source; ratio = target / spacing per axis), optionally fused with
// transforms.normalise (block.py's order: resample to the model spacing, then normalise).
extern "C" __global__ void resample_centred_i16(const short* __restrict__ src, float* __restrict__ dst,
                                                idx_t di, idx_t hi, idx_t wi, idx_t d, idx_t h, idx_t w,
                                                double rz, double ry, double rx, int a0, int a1, int a2,
                                                int normalise, float clip_lo, float clip_hi, float offset,
                                                float scale) {
    resample(src, dst, di, hi, wi, d, h, w, 1, rz, ry, rx, a0, a1, a2, normalise, clip_lo, clip_hi, offset, scale);
}

// transforms.resample_centred (float32 source), optionally fused with transforms.normalise.
extern "C" __global__ void resample_centred_f32(const float* __restrict__ src, float* __restrict__ dst,
                                                idx_t di, idx_t hi, idx_t wi, idx_t d, idx_t h, idx_t w,
                                                double rz, double ry, double rx, int a0, int a1, int a2,
                                                int normalise, float clip_lo, float clip_hi, float offset,
                                                float scale) {
    resample(src, dst, di, hi, wi, d, h, w, 1, rz, ry, rx, a0, a1, a2, normalise, clip_lo, clip_hi, offset, scale);
}

// transforms.normalise, in place: x' = (clip(x, lo, hi) + offset) * scale.
extern "C" __global__ void normalise(float* __restrict__ x, idx_t n, float clip_lo, float clip_hi, float offset,
                                     float scale) {
    FOR_EACH(i, n) x[i] = normalise_value(x[i], clip_lo, clip_hi, offset, scale);
}

// ---------------------------------------------------------------------------------- sliding window

// window.sliding_window's tile gather: tile b of shape (d, h, w) starts at corners[3b .. 3b+2] (int32
// z, y, x) in the (D, H, W) volume; voxels outside it are pad_value, as sliding_window pads the image
// to at least the patch size. Output: (batch, 1, d, h, w), contiguous.
extern "C" __global__ void extract_tiles(const float* __restrict__ volume, float* __restrict__ tiles,
                                         const int* __restrict__ corners, int batch, idx_t D, idx_t H, idx_t W,
                                         idx_t d, idx_t h, idx_t w, float pad_value) {
    const idx_t tile = d * h * w;
    FOR_EACH(i, tile * batch) {
        const idx_t b = i / tile;
        idx_t dz, dy, dx;
        unravel(i - b * tile, h, w, dz, dy, dx);
        const idx_t z = corners[3 * b] + dz, y = corners[3 * b + 1] + dy, x = corners[3 * b + 2] + dx;
        const bool inside = z >= 0 && z < D && y >= 0 && y < H && x >= 0 && x < W;
        tiles[i] = inside ? volume[(z * H + y) * W + x] : pad_value;
    }
}

// window.sliding_window's accumulation of one tile at (z0, y0, x0):
//   acc[k, z0+dz, y0+dy, x0+dx] += probs[k, dz, dy, dx] * weights[dz, dy, dx];  norm[...] += weights
// (weights = window.gaussian_weights(patch)), skipping voxels outside the (D, H, W) volume (the
// padding sliding_window crops away). One launch per tile: tiles overlap, and one thread per tile
// voxel writes all K channels of it, so no two threads of a launch touch the same element and the
// sum runs in numpy's tile order.
extern "C" __global__ void accumulate_tile(float* __restrict__ acc, float* __restrict__ norm,
                                           const float* __restrict__ probs, const float* __restrict__ weights,
                                           int channels, idx_t D, idx_t H, idx_t W, idx_t d, idx_t h, idx_t w,
                                           idx_t z0, idx_t y0, idx_t x0) {
    const idx_t tile = d * h * w, volume = D * H * W;
    FOR_EACH(i, tile) {
        idx_t dz, dy, dx;
        unravel(i, h, w, dz, dy, dx);
        const idx_t z = z0 + dz, y = y0 + dy, x = x0 + dx;
        if (z < 0 || z >= D || y < 0 || y >= H || x < 0 || x >= W) continue;
        const idx_t v = (z * H + y) * W + x;
        const float weight = weights[i];
        for (idx_t k = 0; k < channels; ++k)
            acc[k * volume + v] = __fadd_rn(acc[k * volume + v], __fmul_rn(probs[k * tile + i], weight));
        norm[v] = __fadd_rn(norm[v], weight);
    }
}

// ------------------------------------------------------------------------------------------ labels

// transforms.labels_on_native_grid: (K, d, h, w) probabilities -> (D, H, W) uint8 labels, each channel
// resampled with resample_linear's rule (end voxel centres aligned; (a0, a1, a2) numpy's axis order for
// (d, h, w) -> (D, H, W)), then K == 2: label = (p1 - p0) > 0 (the difference interpolated, as numpy
// does); else argmax, ties to the lowest k (a strict >, as numpy's ``channel > best``; NaN as np.maximum).
//
// norm: the accumulated Gaussian weights, or null when acc already holds averaged probabilities. The
// division cannot be dropped: an argmax, and the sign of p1 - p0, are invariant to a positive factor per
// voxel, but interpolation mixes eight model-grid voxels whose weight sums differ where tiles overlap,
// so interpolating acc instead of acc / norm moves the boundaries (and a sigmoid threshold, p > t, is not
// invariant to any factor). Each corner is therefore divided by its own norm before interpolating.
extern "C" __global__ void labels_native_argmax(const float* __restrict__ acc, const float* __restrict__ norm,
                                                unsigned char* __restrict__ labels, int channels,
                                                idx_t d, idx_t h, idx_t w, idx_t D, idx_t H, idx_t W,
                                                int a0, int a1, int a2) {
    const idx_t grid = d * h * w;
    FOR_EACH(i, D * H * W) {
        idx_t z, y, x;
        unravel(i, H, W, z, y, x);
        const Tap tz = aligned_tap(z, d, D), ty = aligned_tap(y, h, H), tx = aligned_tap(x, w, W);
        unsigned char label = 0;
        if (channels == 2) {
            Difference difference;
            difference.acc = acc;
            difference.norm = norm;
            difference.n = grid;
            label = trilinear(difference, h, w, tz, ty, tx, a0, a1, a2) > 0.0f ? 1 : 0;
        } else {
            float best = -__int_as_float(0x7f800000);  // -inf
            for (int k = 0; k < channels; ++k) {
                Probability p;
                p.acc = acc;
                p.norm = norm;
                p.n = grid;
                p.k = k;
                const float c = trilinear(p, h, w, tz, ty, tx, a0, a1, a2);
                if (c > best) label = (unsigned char)k;
                if (c > best || c != c) best = c;  // np.maximum(best, c): NaN sticks
            }
        }
        labels[i] = label;
    }
}

// block.py's sigmoid path: probabilities[i] > post.threshold (threshold as float32, the comparison
// numpy makes), as a uint8 label: value where above, 0 elsewhere.
extern "C" __global__ void threshold_sigmoid(const float* __restrict__ probs, unsigned char* __restrict__ labels,
                                             idx_t n, float threshold, int value) {
    FOR_EACH(i, n) labels[i] = probs[i] > threshold ? (unsigned char)value : (unsigned char)0;
}

// ------------------------------------------------------------------------------------- single block

// block.place_in_block: the (n0, n1, n2) image centred in a (b0, b1, b2) block filled with pad_value:
// image voxel 0 at block index b//2 - n//2 per axis; an image larger than the block keeps its centre.
extern "C" __global__ void place_in_block(const float* __restrict__ image, float* __restrict__ block,
                                          idx_t n0, idx_t n1, idx_t n2, idx_t b0, idx_t b1, idx_t b2,
                                          float pad_value) {
    const idx_t o0 = b0 / 2 - n0 / 2, o1 = b1 / 2 - n1 / 2, o2 = b2 / 2 - n2 / 2;
    FOR_EACH(i, b0 * b1 * b2) {
        idx_t z, y, x;
        unravel(i, b1, b2, z, y, x);
        z -= o0;
        y -= o1;
        x -= o2;
        const bool inside = z >= 0 && z < n0 && y >= 0 && y < n1 && x >= 0 && x < n2;
        block[i] = inside ? image[(z * n1 + y) * n2 + x] : pad_value;
    }
}
