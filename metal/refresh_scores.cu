// CUDA twin of refresh_scores.metal: the same kernels, tiling and names, line
// by line, so that what the Metal kernels do runs on the lent H100.
//
// RefreshKV's refresh step: softmax(q·Kᵀ·scale) of one query per head over all
// N keys, max-pooled along the keys and reduced by max over each GQA group,
// giving one score per (KV head, key) to pick the retained set from.
// Pass 1 (score_logits, or score_logits_quantized over a cache quantized per
// token): one threadgroup per (block of BLOCK_KEYS keys, KV head, batch); one
// thread per key computes its logits for the GROUP query heads (staged in
// shared memory, so each key row is read once for the whole group) and the
// block's max and sum of exponentials per query head. Pass 2 (refresh_scores):
// same grid; each threadgroup first merges the block statistics into each
// head's softmax max and sum, then each thread normalises the logits in its
// key's pooling window for every head of the group and keeps the largest.
//
// Template constants (set by mlx_kvcache/kernels.py): T, D, GROUP, BLOCK_KEYS,
// POOL, and for the quantized pass BITS (2, 4, 8) and GROUP_SIZE.
// sizes = [rows in the cache buffer, N, blocks].

// header
#define NEG_INF (-inf)

template <int THREADS>
__device__ float block_max(float x, float* scratch, int tid) {
  scratch[tid] = x;
  __syncthreads();
  for (int stride = THREADS / 2; stride > 0; stride /= 2) {
    if (tid < stride) {
      scratch[tid] = fmaxf(scratch[tid], scratch[tid + stride]);
    }
    __syncthreads();
  }
  const float result = scratch[0];
  __syncthreads();
  return result;
}

template <int THREADS>
__device__ float block_sum(float x, float* scratch, int tid) {
  scratch[tid] = x;
  __syncthreads();
  for (int stride = THREADS / 2; stride > 0; stride /= 2) {
    if (tid < stride) {
      scratch[tid] = scratch[tid] + scratch[tid + stride];
    }
    __syncthreads();
  }
  const float result = scratch[0];
  __syncthreads();
  return result;
}

// Logits of one key for the GROUP heads, written out, and the block's
// statistics per head: shared by both first passes.
template <int GROUP, int BLOCK_KEYS>
__device__ void write_block_logits(
    float* logit, bool valid, int key, int block, int n_keys, int n_blocks,
    size_t first_q_head, float* scratch, int tid,
    float* logits, float* block_maxima, float* block_sums) {
  for (int g = 0; g < GROUP; ++g) {
    const size_t q_head = first_q_head + g;
    if (valid) {
      logits[q_head * n_keys + key] = logit[g];
    }
    const float maximum = block_max<BLOCK_KEYS>(valid ? logit[g] : NEG_INF, scratch, tid);
    const float total = block_sum<BLOCK_KEYS>(valid ? expf(logit[g] - maximum) : 0.0f, scratch, tid);
    if (tid == 0) {
      block_maxima[q_head * n_blocks + block] = maximum;
      block_sums[q_head * n_blocks + block] = total;
    }
  }
}

// kernel: score_logits
__shared__ float q_tile[GROUP][D];
__shared__ float scratch[BLOCK_KEYS];

const int block = blockIdx.x;
const int kv_head = blockIdx.y;
const int batch = blockIdx.z;
const int n_kv_heads = gridDim.y;
const int n_blocks = gridDim.x;
const int tid = threadIdx.x;

const int buffer_rows = sizes[0];
const int n_keys = sizes[1];
const float scale = scale_factor[0];
const size_t head = (size_t)batch * n_kv_heads + kv_head;
const T* head_queries = queries + head * GROUP * D;
for (int e = tid; e < GROUP * D; e += BLOCK_KEYS) {
  q_tile[e / D][e % D] = static_cast<float>(head_queries[e]) * scale;
}
__syncthreads();

const int key = block * BLOCK_KEYS + tid;
const bool valid = key < n_keys;
const T* key_row = keys + (head * buffer_rows + (valid ? key : 0)) * D;
float logit[GROUP];
for (int g = 0; g < GROUP; ++g) {
  logit[g] = 0.0f;
}
for (int d = 0; d < D; ++d) {
  const float k = static_cast<float>(key_row[d]);
  for (int g = 0; g < GROUP; ++g) {
    logit[g] += q_tile[g][d] * k;
  }
}
write_block_logits<GROUP, BLOCK_KEYS>(
    logit, valid, key, block, n_keys, n_blocks, head * GROUP, scratch, tid,
    logits, block_maxima, block_sums);

// kernel: score_logits_quantized
constexpr int PER_WORD = 32 / BITS;
constexpr int WORDS = D / PER_WORD;
constexpr int GROUPS = D / GROUP_SIZE;
constexpr uint32_t MASK = (1u << BITS) - 1u;
__shared__ float q_tile[GROUP][D];
__shared__ float scratch[BLOCK_KEYS];

const int block = blockIdx.x;
const int kv_head = blockIdx.y;
const int batch = blockIdx.z;
const int n_kv_heads = gridDim.y;
const int n_blocks = gridDim.x;
const int tid = threadIdx.x;

const int buffer_rows = sizes[0];
const int n_keys = sizes[1];
const float scale = scale_factor[0];
const size_t head = (size_t)batch * n_kv_heads + kv_head;
const T* head_queries = queries + head * GROUP * D;
for (int e = tid; e < GROUP * D; e += BLOCK_KEYS) {
  q_tile[e / D][e % D] = static_cast<float>(head_queries[e]) * scale;
}
__syncthreads();

const int key = block * BLOCK_KEYS + tid;
const bool valid = key < n_keys;
const size_t row = head * buffer_rows + (valid ? key : 0);
const uint32_t* key_words = words + row * WORDS;
float logit[GROUP];
for (int g = 0; g < GROUP; ++g) {
  logit[g] = 0.0f;
}
for (int d = 0; d < D; ++d) {
  const uint32_t code = (key_words[d / PER_WORD] >> ((d % PER_WORD) * BITS)) & MASK;
  const int group = d / GROUP_SIZE;
  const float k = static_cast<float>(scales[row * GROUPS + group]) * static_cast<float>(code)
      + static_cast<float>(biases[row * GROUPS + group]);
  for (int g = 0; g < GROUP; ++g) {
    logit[g] += q_tile[g][d] * k;
  }
}
write_block_logits<GROUP, BLOCK_KEYS>(
    logit, valid, key, block, n_keys, n_blocks, head * GROUP, scratch, tid,
    logits, block_maxima, block_sums);

// kernel: refresh_scores
__shared__ float scratch[BLOCK_KEYS];
__shared__ float head_max[GROUP];
__shared__ float head_sum[GROUP];

const int block = blockIdx.x;
const int kv_head = blockIdx.y;
const int batch = blockIdx.z;
const int n_kv_heads = gridDim.y;
const int tid = threadIdx.x;
const int n_keys = sizes[1];
const int n_blocks = sizes[2];
const size_t head = (size_t)batch * n_kv_heads + kv_head;

for (int g = 0; g < GROUP; ++g) {
  const size_t stats = (head * GROUP + g) * n_blocks;
  float maximum = NEG_INF;
  for (int b = tid; b < n_blocks; b += BLOCK_KEYS) {
    maximum = fmaxf(maximum, block_maxima[stats + b]);
  }
  maximum = block_max<BLOCK_KEYS>(maximum, scratch, tid);
  float total = 0.0f;
  for (int b = tid; b < n_blocks; b += BLOCK_KEYS) {
    total += block_sums[stats + b] * expf(block_maxima[stats + b] - maximum);
  }
  total = block_sum<BLOCK_KEYS>(total, scratch, tid);
  if (tid == 0) {
    head_max[g] = maximum;
    head_sum[g] = total;
  }
}
__syncthreads();

const int key = block * BLOCK_KEYS + tid;
if (key < n_keys) {
  const int window_start = max(key - POOL / 2, 0);
  const int window_end = min(key - POOL / 2 + POOL, n_keys);
  float best = NEG_INF;
  for (int g = 0; g < GROUP; ++g) {
    const float* head_logits = logits + (head * GROUP + g) * n_keys;
    for (int w = window_start; w < window_end; ++w) {
      best = fmaxf(best, expf(head_logits[w] - head_max[g]) / head_sum[g]);
    }
  }
  per_head[head * n_keys + key] = best;
}
