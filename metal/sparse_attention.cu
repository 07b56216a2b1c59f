// CUDA twin of sparse_attention.metal: the same two kernels, tiling and names,
// line by line, so that what the Metal kernel does runs on the lent H100.
//
// Attention of a few queries per head over K retained rows of the full cache,
// flash-decoding style. Pass 1 (sparse_attention_partials): one threadgroup per
// (split of split_rows retained rows, KV head, batch). Its threads stage
// TILE_ROWS retained rows of K and V at a time in shared memory, gathered by
// index, so every row is read from memory once for all QR = (Hq / Hkv) * L
// query rows of the KV head's group. Each warp owns query rows warp,
// warp + WARPS, ...; each lane owns channels lane, lane + 32, ... and keeps an
// online softmax (running max, sum, weighted values). Pass 2
// (sparse_attention_reduce): one warp per query row merges the splits.
//
// Template constants (set by mlx_kvcache/kernels.py): T, D, QR, TILE_ROWS,
// WARPS. sizes = [rows in the cache buffer, K, splits, split_rows].

// header
#define NEG_INF (-inf)

__device__ inline float warp_sum(float x) {
  for (int offset = 16; offset > 0; offset /= 2) {
    x += __shfl_xor_sync(0xffffffff, x, offset);
  }
  return x;
}

// kernel: sparse_attention_partials
constexpr int LANES = 32;
constexpr int D_PER_LANE = (D + LANES - 1) / LANES;
constexpr int ROWS_PER_WARP = (QR + WARPS - 1) / WARPS;
__shared__ float k_tile[TILE_ROWS][D];
__shared__ float v_tile[TILE_ROWS][D];

const int split = blockIdx.x;
const int kv_head = blockIdx.y;
const int batch = blockIdx.z;
const int n_kv_heads = gridDim.y;
const int splits = gridDim.x;
const int tid = threadIdx.x;
const int lane = tid % LANES;
const int warp = tid / LANES;
const int threads = blockDim.x;

const int buffer_rows = sizes[0];
const int n_retained = sizes[1];
const int split_rows = sizes[3];
const float scale = scale_factor[0];
const size_t head = (size_t)batch * n_kv_heads + kv_head;
const T* head_keys = keys + head * buffer_rows * D;
const T* head_values = values + head * buffer_rows * D;
const uint32_t* head_indices = indices + head * n_retained;
const T* head_queries = queries + head * QR * D;

float q[ROWS_PER_WARP][D_PER_LANE];
float acc[ROWS_PER_WARP][D_PER_LANE];
float running_max[ROWS_PER_WARP];
float running_sum[ROWS_PER_WARP];
for (int i = 0; i < ROWS_PER_WARP; ++i) {
  const int row = warp + i * WARPS;
  for (int j = 0; j < D_PER_LANE; ++j) {
    const int d = lane + j * LANES;
    q[i][j] = (row < QR && d < D) ? static_cast<float>(head_queries[row * D + d]) * scale : 0.0f;
    acc[i][j] = 0.0f;
  }
  running_max[i] = NEG_INF;
  running_sum[i] = 0.0f;
}

const int first = split * split_rows;
const int last = min(first + split_rows, n_retained);
for (int tile = first; tile < last; tile += TILE_ROWS) {
  const int rows = min(TILE_ROWS, last - tile);
  __syncthreads();
  for (int e = tid; e < rows * D; e += threads) {
    const int t = e / D;
    const int d = e % D;
    const size_t source = (size_t)head_indices[tile + t] * D + d;
    k_tile[t][d] = static_cast<float>(head_keys[source]);
    v_tile[t][d] = static_cast<float>(head_values[source]);
  }
  __syncthreads();
  for (int t = 0; t < rows; ++t) {
    for (int i = 0; i < ROWS_PER_WARP; ++i) {
      if (warp + i * WARPS >= QR) {
        break;
      }
      float dot = 0.0f;
      for (int j = 0; j < D_PER_LANE; ++j) {
        const int d = lane + j * LANES;
        dot += (d < D) ? q[i][j] * k_tile[t][d] : 0.0f;
      }
      dot = warp_sum(dot);
      const float new_max = fmaxf(running_max[i], dot);
      const float correction = expf(running_max[i] - new_max);
      const float p = expf(dot - new_max);
      running_sum[i] = running_sum[i] * correction + p;
      for (int j = 0; j < D_PER_LANE; ++j) {
        const int d = lane + j * LANES;
        acc[i][j] = acc[i][j] * correction + ((d < D) ? p * v_tile[t][d] : 0.0f);
      }
      running_max[i] = new_max;
    }
  }
}

const size_t part = (head * splits + split) * QR;
for (int i = 0; i < ROWS_PER_WARP; ++i) {
  const int row = warp + i * WARPS;
  if (row >= QR) {
    break;
  }
  for (int j = 0; j < D_PER_LANE; ++j) {
    const int d = lane + j * LANES;
    if (d < D) {
      partial_out[(part + row) * D + d] = acc[i][j];
    }
  }
  if (lane == 0) {
    partial_max[part + row] = running_max[i];
    partial_sum[part + row] = running_sum[i];
  }
}

// kernel: sparse_attention_reduce
constexpr int LANES = 32;
constexpr int D_PER_LANE = (D + LANES - 1) / LANES;

const int row_in_batch = blockIdx.y;  // kv_head * QR + query row
const int batch = blockIdx.z;
const int lane = threadIdx.x;
const int splits = sizes[2];
const int kv_head = row_in_batch / QR;
const int row = row_in_batch % QR;
const size_t head = (size_t)batch * (gridDim.y / QR) + kv_head;

float global_max = NEG_INF;
for (int s = 0; s < splits; ++s) {
  global_max = fmaxf(global_max, partial_max[(head * splits + s) * QR + row]);
}
float total = 0.0f;
float merged[D_PER_LANE];
for (int j = 0; j < D_PER_LANE; ++j) {
  merged[j] = 0.0f;
}
for (int s = 0; s < splits; ++s) {
  const size_t part = (head * splits + s) * QR + row;
  const float weight = expf(partial_max[part] - global_max);
  total += weight * partial_sum[part];
  for (int j = 0; j < D_PER_LANE; ++j) {
    const int d = lane + j * LANES;
    if (d < D) {
      merged[j] += weight * partial_out[part * D + d];
    }
  }
}
const size_t out_row = (size_t)batch * gridDim.y + row_in_batch;
for (int j = 0; j < D_PER_LANE; ++j) {
  const int d = lane + j * LANES;
  if (d < D) {
    out[out_row * D + d] = static_cast<T>(merged[j] / total);
  }
}
