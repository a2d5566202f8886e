// moec's native assignment kernels: where every routed row goes.
//
// The layout contract (moec book, "The runtime" > "Where routed rows go";
// runtime/src/cpu/layout.rs is the reference implementation these kernels
// are tested against), per EP group of G ranks and per token chunk c:
//   - a rank's send buffer holds its kept assignments ordered by destination
//     EP rank, then the destination's local expert, then token, then slot;
//     slots[t, j] is the send row of assignment (t, j), or -1 when dropped;
//   - the routing table table[c][s][g][l] counts the rows source s sends to
//     local expert l of EP rank g (every rank of the group derives the same
//     table from the exchanged metadata).
//
// Launch contract: as the generated kernels' (a buffer is a pointer and its
// length in elements, scalars are long long, then `rows` and a four-word
// `status`), one row per thread over a grid-stride loop, every buffer access
// checked. Codes in status[0]: 1 buffer index out of bounds (status[1] the
// parameter, [2] the index, [3] the row); 4 an expert id outside 0..E
// ([1] the id, [2] its index); 5 a non-finite routing weight ([2] its
// index); 6 corrupt metadata from a peer ([1] the peer, [2] the value);
// 7 the exchanged counts disagree with this rank's own routing ([1] the
// chunk, [2] the destination rank, [3] the local expert).
//
// Dest tables: dest_rank[s * E + e] and dest_local[s * E + e] are the EP
// rank and local index that source s sends expert e to (replicas are shared
// out by source rank); max_local is the most experts any rank holds.
//
// No header is included: the source compiles with NVRTC alone, and for the
// host with a few lines of shim (runtime tests).

static __device__ void moec_native_fail(long long* status, long long code, long long which,
                                        long long index, long long row)
{
    if (atomicCAS((unsigned long long*)status, 0ull, (unsigned long long)code) == 0ull) {
        status[1] = which;
        status[2] = index;
        status[3] = row;
    }
}

// A bounds check of parameter `p` (its index in the launch) at index `i`.
#define MOEC_IN(p, len, i) \
    if ((unsigned long long)(i) >= (len)) { moec_native_fail(moec_status, 1, (p), (long long)(i), moec_row); return; }

#define MOEC_ROWS_BEGIN \
    const long long moec_step = (long long)gridDim.x * (long long)blockDim.x; \
    for (long long moec_row = (long long)blockIdx.x * (long long)blockDim.x + (long long)threadIdx.x; \
         moec_row < moec_rows; moec_row += moec_step) {
#define MOEC_ROWS_END }

static __device__ __forceinline__ bool moec_finite(float w)
{
    return (__float_as_uint(w) & 0x7f800000u) != 0x7f800000u;
}

// The key `total_cmp` orders f32 by: ascending keys, ascending values
// (-NaN < -inf < ... < -0 < +0 < ... < +inf < +NaN).
static __device__ __forceinline__ unsigned int moec_total_key(unsigned int bits)
{
    return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// assign_count: this rank's metadata for the exchange. One row per token t.
// Counts (dropless, drop = position): meta[c * chunk_stride + e] += 1 for
// each assignment (meta zeroed before the launch). chunk_stride is E, or
// E + G when the plan dispatches by rank: the CPU's layout keeps G by-rank
// row counts after each chunk's expert counts, which assign_rank_count adds.
// drop = probs (probs = 1):
// meta[t * 2k + j] = e, meta[t * 2k + k + j] = the weight's bits.
extern "C" __global__ void moec_assign_count(
    const int* __restrict__ p0_ids, unsigned long long p0_ids_len,
    const float* __restrict__ p1_weights, unsigned long long p1_weights_len,
    int* __restrict__ p2_meta, unsigned long long p2_meta_len,
    long long tokens, long long top_k, long long experts, long long chunk_tokens, long long probs,
    long long chunk_stride,
    long long moec_rows,
    long long* __restrict__ moec_status)
{
    (void)tokens;
    MOEC_ROWS_BEGIN
        const long long t = moec_row;
        for (long long j = 0; j < top_k; ++j) {
            const long long i = t * top_k + j;
            MOEC_IN(0, p0_ids_len, i);
            const int e = p0_ids[i];
            if (e < 0 || (long long)e >= experts) { moec_native_fail(moec_status, 4, e, i, moec_row); return; }
            MOEC_IN(1, p1_weights_len, i);
            const float w = p1_weights[i];
            if (!moec_finite(w)) { moec_native_fail(moec_status, 5, 1, i, moec_row); return; }
            if (probs) {
                const long long a = t * 2 * top_k + j;
                const long long b = a + top_k;
                MOEC_IN(2, p2_meta_len, a);
                MOEC_IN(2, p2_meta_len, b);
                p2_meta[a] = e;
                p2_meta[b] = (int)__float_as_uint(w);
            } else {
                const long long c = chunk_tokens > 0 ? t / chunk_tokens : 0;
                const long long m = c * chunk_stride + e;
                MOEC_IN(2, p2_meta_len, m);
                atomicAdd(&p2_meta[m], 1);
            }
        }
    MOEC_ROWS_END
}

// assign_rank_count (dispatch by rank, dropless and drop = position): one
// row per token t. Adds one to meta[c * chunk_stride + experts + g] for each
// distinct destination EP rank g of t's picks (g = dest_rank[me * E + e]),
// as cpu::layout's Geometry::for_each_rank visits them: the by-rank row
// counts the exchange carries after each chunk's expert counts, from which
// every rank of the group derives the by-rank routing table. Launched after
// assign_count on the same meta.
extern "C" __global__ void moec_assign_rank_count(
    const int* __restrict__ p0_ids, unsigned long long p0_ids_len,
    const int* __restrict__ p1_dest_rank, unsigned long long p1_dest_rank_len,
    int* __restrict__ p2_meta, unsigned long long p2_meta_len,
    long long me, long long top_k, long long experts, long long chunk_tokens,
    long long chunk_stride,
    long long moec_rows,
    long long* __restrict__ moec_status)
{
    MOEC_ROWS_BEGIN
        const long long t = moec_row;
        const long long c = chunk_tokens > 0 ? t / chunk_tokens : 0;
        for (long long j = 0; j < top_k; ++j) {
            MOEC_IN(0, p0_ids_len, t * top_k + j);
            const long long e = p0_ids[t * top_k + j];
            if (e < 0 || e >= experts) { moec_native_fail(moec_status, 4, e, t * top_k + j, moec_row); return; }
            MOEC_IN(1, p1_dest_rank_len, me * experts + e);
            const long long g = p1_dest_rank[me * experts + e];
            bool seen = false;
            for (long long j2 = 0; j2 < j; ++j2) {
                // In bounds: the iteration of j2 checked both indices.
                const long long e2 = p0_ids[t * top_k + j2];
                seen = seen || p1_dest_rank[me * experts + e2] == g;
            }
            if (seen) continue;
            if (g < 0 || experts + g >= chunk_stride) {
                moec_native_fail(moec_status, 1, 1, me * experts + e, moec_row);
                return;
            }
            const long long m = c * chunk_stride + experts + g;
            MOEC_IN(2, p2_meta_len, m);
            atomicAdd(&p2_meta[m], 1);
        }
    MOEC_ROWS_END
}

// assign_keep_counts (dropless and drop = position): one row per expert e.
// Walks the group's counts in (source, chunk) order, keeps the first
// `capacity` assignments of e (all with capacity < 0), adds the kept rows to
// table[c][s][dest(s, e)] (zeroed before) and writes this rank's kept count
// per chunk to keep_own[c * E + e]. A rank's counts are `chunks` runs of
// chunk_stride values (see assign_count).
extern "C" __global__ void moec_assign_keep_counts(
    const int* __restrict__ p0_meta_all, unsigned long long p0_meta_all_len,
    const int* __restrict__ p1_dest_rank, unsigned long long p1_dest_rank_len,
    const int* __restrict__ p2_dest_local, unsigned long long p2_dest_local_len,
    int* __restrict__ p3_table, unsigned long long p3_table_len,
    int* __restrict__ p4_keep_own, unsigned long long p4_keep_own_len,
    long long group, long long me, long long experts, long long chunks, long long max_local,
    long long capacity, long long chunk_stride,
    long long moec_rows,
    long long* __restrict__ moec_status)
{
    MOEC_ROWS_BEGIN
        const long long e = moec_row;
        const long long per = chunks * chunk_stride;
        long long before = 0;
        for (long long s = 0; s < group; ++s) {
            MOEC_IN(1, p1_dest_rank_len, s * experts + e);
            MOEC_IN(2, p2_dest_local_len, s * experts + e);
            const long long g = p1_dest_rank[s * experts + e];
            const long long l = p2_dest_local[s * experts + e];
            for (long long c = 0; c < chunks; ++c) {
                MOEC_IN(0, p0_meta_all_len, s * per + c * chunk_stride + e);
                const long long n = p0_meta_all[s * per + c * chunk_stride + e];
                if (n < 0) { moec_native_fail(moec_status, 6, s, n, moec_row); return; }
                long long keep = n;
                if (capacity >= 0) {
                    const long long room = capacity > before ? capacity - before : 0;
                    keep = n < room ? n : room;
                }
                before += n;
                if (s == me) {
                    MOEC_IN(4, p4_keep_own_len, c * experts + e);
                    p4_keep_own[c * experts + e] = (int)keep;
                }
                const long long cell = ((c * group + s) * group + g) * max_local + l;
                MOEC_IN(3, p3_table_len, cell);
                p3_table[cell] += (int)keep;
            }
        }
    MOEC_ROWS_END
}

// drop = probs: an assignment to expert e is kept when fewer than
// `capacity` assignments to e rank before it: a larger weight (f32 total
// order), or an equal one earlier in (source, token, slot) order. The
// assignments of the group are numbered s-major, row = (s * tokens + t) *
// top_k + j, so that order is row order, and each is ranked by sorting the
// group's assignments per expert on the key (weight descending, row):
//   probs_count   one row per assignment: cursor[e] += 1 (zeroed before);
//   probs_starts  one row: starts[e] = the first sorted position of e's
//                 bucket (starts[E] = all), cursor[e] = starts[e];
//   probs_fill    one row per assignment: its key and row into e's bucket
//                 (keys[p], order[p]) at a position taken from cursor[e];
//                 the order inside a bucket is the atomics', not the rows';
//   probs_merge   one launch per width 2^shift, 1 .. the first power of two
//                 >= all assignments (no bucket is larger): one row per
//                 position, merging pairs of sorted runs of that width inside
//                 each bucket from (keys, order) into the other pair of
//                 buffers (see moec_probs_merges in kernels/src/native.rs);
//   assign_keep_probs  one row per sorted position: kept when its place in
//                 its bucket is below `capacity`.
// Work: O(n log^2 n) for n assignments (log n merge launches, each a binary
// search per position), against O(n^2) for ranking every assignment against
// every other. Keys are unique (the row is part of them), so a position's
// place in the merged run is its place in its own run plus the count of
// smaller keys in the other run: no two positions collide and the launches
// need no synchronisation inside them.

// The sort key's first part: ascending keys are descending weights.
static __device__ __forceinline__ unsigned int moec_probs_key(unsigned int bits)
{
    return ~moec_total_key(bits);
}

// Whether (key a, row ra) sorts before (key b, row rb).
static __device__ __forceinline__ bool moec_probs_before(unsigned int a, int ra, unsigned int b, int rb)
{
    return a < b || (a == b && ra < rb);
}

// The bucket (expert) of sorted position p: the last e with starts[e] <= p,
// for monotone starts with starts[0] = 0 <= p < starts[experts] (checked by
// the callers). O(log experts), no division.
static __device__ __forceinline__ long long moec_bucket_of(const int* starts, long long experts, long long p)
{
    long long lo = 0, hi = experts;
    while (hi - lo > 1) {
        const long long mid = lo + (hi - lo) / 2;
        if ((long long)starts[mid] <= p) lo = mid; else hi = mid;
    }
    return lo;
}

// The metadata index of assignment `row`'s expert id (its weight's bits
// follow top_k ints later): per (source, token) block, top_k ids then top_k
// weights, so row r = b * top_k + j sits at b * 2 * top_k + j.
static __device__ __forceinline__ long long moec_probs_meta_index(long long row, long long top_k)
{
    return row + (row / top_k) * top_k;
}

extern "C" __global__ void moec_probs_count(
    const int* __restrict__ p0_meta_all, unsigned long long p0_meta_all_len,
    int* __restrict__ p1_cursor, unsigned long long p1_cursor_len,
    long long tokens, long long top_k, long long experts,
    long long moec_rows,
    long long* __restrict__ moec_status)
{
    MOEC_ROWS_BEGIN
        const long long ia = moec_probs_meta_index(moec_row, top_k);
        MOEC_IN(0, p0_meta_all_len, ia + top_k);
        const int e = p0_meta_all[ia];
        const unsigned int wb = (unsigned int)p0_meta_all[ia + top_k];
        if (e < 0 || (long long)e >= experts || !moec_finite(__uint_as_float(wb))) {
            // status[1] the source, [2] the bad id or the weight's bits.
            const long long s = moec_row / (top_k * tokens);
            const long long bad = (e < 0 || (long long)e >= experts) ? (long long)e : (long long)wb;
            moec_native_fail(moec_status, 6, s, bad, moec_row);
            return;
        }
        MOEC_IN(1, p1_cursor_len, e);
        atomicAdd(&p1_cursor[e], 1);
    MOEC_ROWS_END
}

extern "C" __global__ void moec_probs_starts(
    int* __restrict__ p0_cursor, unsigned long long p0_cursor_len,
    int* __restrict__ p1_starts, unsigned long long p1_starts_len,
    long long experts,
    long long moec_rows,
    long long* __restrict__ moec_status)
{
    MOEC_ROWS_BEGIN
        MOEC_IN(0, p0_cursor_len, experts - 1);
        MOEC_IN(1, p1_starts_len, experts);
        long long at = 0;
        for (long long e = 0; e < experts; ++e) {
            const long long n = p0_cursor[e];
            p1_starts[e] = (int)at;
            p0_cursor[e] = (int)at;
            at += n;
        }
        p1_starts[experts] = (int)at;
    MOEC_ROWS_END
}

extern "C" __global__ void moec_probs_fill(
    const int* __restrict__ p0_meta_all, unsigned long long p0_meta_all_len,
    int* __restrict__ p1_cursor, unsigned long long p1_cursor_len,
    int* __restrict__ p2_keys, unsigned long long p2_keys_len,
    int* __restrict__ p3_order, unsigned long long p3_order_len,
    long long top_k,
    long long moec_rows,
    long long* __restrict__ moec_status)
{
    MOEC_ROWS_BEGIN
        const long long ia = moec_probs_meta_index(moec_row, top_k);
        MOEC_IN(0, p0_meta_all_len, ia + top_k);
        const int e = p0_meta_all[ia];
        MOEC_IN(1, p1_cursor_len, e);
        const long long p = atomicAdd(&p1_cursor[e], 1);
        MOEC_IN(2, p2_keys_len, p);
        MOEC_IN(3, p3_order_len, p);
        p2_keys[p] = (int)moec_probs_key((unsigned int)p0_meta_all[ia + top_k]);
        p3_order[p] = (int)moec_row;
    MOEC_ROWS_END
}

extern "C" __global__ void moec_probs_merge(
    const int* __restrict__ p0_keys, unsigned long long p0_keys_len,
    const int* __restrict__ p1_order, unsigned long long p1_order_len,
    const int* __restrict__ p2_starts, unsigned long long p2_starts_len,
    int* __restrict__ p3_keys_out, unsigned long long p3_keys_out_len,
    int* __restrict__ p4_order_out, unsigned long long p4_order_out_len,
    long long experts, long long shift,
    long long moec_rows,
    long long* __restrict__ moec_status)
{
    MOEC_ROWS_BEGIN
        const long long p = moec_row;
        MOEC_IN(2, p2_starts_len, experts);
        // Fewer assignments than rows: probs_count failed on corrupt metadata.
        if (p >= (long long)p2_starts[experts]) { moec_native_fail(moec_status, 6, -1, p, moec_row); return; }
        const long long b = moec_bucket_of(p2_starts, experts, p);
        const long long lo = p2_starts[b];
        const long long hi = p2_starts[b + 1];
        MOEC_IN(0, p0_keys_len, p);
        MOEC_IN(1, p1_order_len, p);
        MOEC_IN(0, p0_keys_len, hi - 1);
        MOEC_IN(1, p1_order_len, hi - 1);
        const unsigned int key = (unsigned int)p0_keys[p];
        const int row = p1_order[p];
        const long long width = 1ll << shift;
        const long long off = p - lo;
        // The pair of runs p's run belongs to starts at `pair`; p's run is
        // the left one when bit `shift` of its offset is clear.
        const long long pair = lo + ((off >> (shift + 1)) << (shift + 1));
        const bool left = ((off >> shift) & 1) == 0;
        long long a = left ? pair + width : pair;  // the other run
        long long z = left ? pair + 2 * width : pair + width;
        if (a > hi) a = hi;
        if (z > hi) z = hi;
        // Lower bound: the other run's keys before (key, row).
        long long first = a, count = z - a;
        while (count > 0) {
            const long long half = count / 2;
            const long long m = first + half;
            if (moec_probs_before((unsigned int)p0_keys[m], p1_order[m], key, row)) {
                first = m + 1;
                count -= half + 1;
            } else {
                count = half;
            }
        }
        const long long own = left ? p - pair : p - (pair + width);
        const long long to = pair + own + (first - a);
        MOEC_IN(3, p3_keys_out_len, to);
        MOEC_IN(4, p4_order_out_len, to);
        p3_keys_out[to] = (int)key;
        p4_order_out[to] = row;
    MOEC_ROWS_END
}

// assign_keep_probs: one row per sorted position p (order[p] the row of the
// assignment there). Kept rows are counted into table (zeroed before); this
// rank's own decisions go to kept_own[t * k + j]. With capacity < 0 every
// assignment is kept.
extern "C" __global__ void moec_assign_keep_probs(
    const int* __restrict__ p0_order, unsigned long long p0_order_len,
    const int* __restrict__ p1_starts, unsigned long long p1_starts_len,
    const int* __restrict__ p2_dest_rank, unsigned long long p2_dest_rank_len,
    const int* __restrict__ p3_dest_local, unsigned long long p3_dest_local_len,
    int* __restrict__ p4_table, unsigned long long p4_table_len,
    unsigned char* __restrict__ p5_kept_own, unsigned long long p5_kept_own_len,
    long long group, long long me, long long tokens, long long top_k, long long experts,
    long long chunk_tokens, long long max_local, long long capacity,
    long long moec_rows,
    long long* __restrict__ moec_status)
{
    MOEC_ROWS_BEGIN
        const long long p = moec_row;
        MOEC_IN(1, p1_starts_len, experts);
        if (p >= (long long)p1_starts[experts]) { moec_native_fail(moec_status, 6, -1, p, moec_row); return; }
        const long long e = moec_bucket_of(p1_starts, experts, p);
        const bool keep = capacity < 0 || p - (long long)p1_starts[e] < capacity;
        MOEC_IN(0, p0_order_len, p);
        const long long row = p0_order[p];
        const long long row_tokens = row / top_k;
        const long long s = row_tokens / tokens;
        const long long t = row_tokens - s * tokens;
        const long long j = row - row_tokens * top_k;
        if (s < 0 || s >= group) { moec_native_fail(moec_status, 6, s, row, moec_row); return; }
        if (keep) {
            MOEC_IN(2, p2_dest_rank_len, s * experts + e);
            MOEC_IN(3, p3_dest_local_len, s * experts + e);
            const long long g = p2_dest_rank[s * experts + e];
            const long long l = p3_dest_local[s * experts + e];
            const long long c = chunk_tokens > 0 ? t / chunk_tokens : 0;
            const long long cell = ((c * group + s) * group + g) * max_local + l;
            MOEC_IN(4, p4_table_len, cell);
            atomicAdd(&p4_table[cell], 1);
        }
        if (s == me) {
            MOEC_IN(5, p5_kept_own_len, t * top_k + j);
            p5_kept_own[t * top_k + j] = keep ? 1 : 0;
        }
    MOEC_ROWS_END
}

// assign_slots: one row per (chunk c, destination g, local expert l) of this
// rank (EP index `me`). The row's expert e is the one this rank sends to
// (g, l); its assignments in chunk c, in token then slot order, get
// consecutive send rows from send_start(me, g, l), the kept ones (position:
// the first keep_own[c * E + e]; probs: kept_own[t * k + j]), the others stay
// -1 (slots is all -1 before the launch). stats[e] counts this rank's
// assignments to e, stats[E] its dropped ones (zeroed before).
extern "C" __global__ void moec_assign_slots(
    const int* __restrict__ p0_ids, unsigned long long p0_ids_len,
    const int* __restrict__ p1_table, unsigned long long p1_table_len,
    const int* __restrict__ p2_keep_own, unsigned long long p2_keep_own_len,
    const unsigned char* __restrict__ p3_kept_own, unsigned long long p3_kept_own_len,
    const int* __restrict__ p4_dest_rank, unsigned long long p4_dest_rank_len,
    const int* __restrict__ p5_dest_local, unsigned long long p5_dest_local_len,
    int* __restrict__ p6_slots, unsigned long long p6_slots_len,
    int* __restrict__ p7_stats, unsigned long long p7_stats_len,
    long long group, long long me, long long tokens, long long top_k, long long experts,
    long long chunk_tokens, long long chunks, long long max_local, long long probs,
    long long moec_rows,
    long long* __restrict__ moec_status)
{
    (void)chunks;
    MOEC_ROWS_BEGIN
        const long long c = moec_row / (group * max_local);
        const long long g = (moec_row / max_local) % group;
        const long long l = moec_row % max_local;
        const long long base = (c * group + me) * group * max_local;
        long long start = 0;
        for (long long x = 0; x < g * max_local + l; ++x) {
            MOEC_IN(1, p1_table_len, base + x);
            start += p1_table[base + x];
        }
        MOEC_IN(1, p1_table_len, base + g * max_local + l);
        const long long end = start + p1_table[base + g * max_local + l];
        long long e = -1;
        for (long long x = 0; x < experts; ++x) {
            MOEC_IN(4, p4_dest_rank_len, me * experts + x);
            MOEC_IN(5, p5_dest_local_len, me * experts + x);
            if (p4_dest_rank[me * experts + x] == g && p5_dest_local[me * experts + x] == l) { e = x; break; }
        }
        long long cursor = start;
        if (e >= 0) {
            long long keep = 0;
            if (!probs) {
                MOEC_IN(2, p2_keep_own_len, c * experts + e);
                keep = p2_keep_own[c * experts + e];
            }
            const long long t0 = c * chunk_tokens;
            const long long t1 = t0 + chunk_tokens < tokens ? t0 + chunk_tokens : tokens;
            long long seen = 0, routed = 0, dropped = 0;
            for (long long t = t0; t < t1; ++t) {
                for (long long j = 0; j < top_k; ++j) {
                    const long long i = t * top_k + j;
                    MOEC_IN(0, p0_ids_len, i);
                    if (p0_ids[i] != e) continue;
                    routed += 1;
                    bool kept;
                    if (probs) {
                        MOEC_IN(3, p3_kept_own_len, i);
                        kept = p3_kept_own[i] != 0;
                    } else {
                        kept = seen < keep;
                        seen += 1;
                    }
                    if (!kept) { dropped += 1; continue; }
                    MOEC_IN(6, p6_slots_len, i);
                    p6_slots[i] = (int)cursor;
                    cursor += 1;
                }
            }
            MOEC_IN(7, p7_stats_len, e);
            MOEC_IN(7, p7_stats_len, experts);
            atomicAdd(&p7_stats[e], (int)routed);
            atomicAdd(&p7_stats[experts], (int)dropped);
        }
        if (cursor != end) { moec_native_fail(moec_status, 7, c, g, l); return; }
    MOEC_ROWS_END
}

// assign_overflow: one row. flag[0] = 1 when this rank receives more rows in
// some chunk than its expert buffers hold (never, with the worst-case
// buffers of dropless plans; the flag tells the host).
extern "C" __global__ void moec_assign_overflow(
    const int* __restrict__ p0_table, unsigned long long p0_table_len,
    unsigned char* __restrict__ p1_flag, unsigned long long p1_flag_len,
    long long group, long long me, long long chunks, long long max_local, long long expert_rows,
    long long moec_rows,
    long long* __restrict__ moec_status)
{
    MOEC_ROWS_BEGIN
        unsigned char over = 0;
        for (long long c = 0; c < chunks; ++c) {
            long long received = 0;
            for (long long s = 0; s < group; ++s) {
                for (long long l = 0; l < max_local; ++l) {
                    const long long cell = ((c * group + s) * group + me) * max_local + l;
                    MOEC_IN(0, p0_table_len, cell);
                    received += p0_table[cell];
                }
            }
            if (received > expert_rows) over = 1;
        }
        MOEC_IN(1, p1_flag_len, 0);
        p1_flag[0] = over;
    MOEC_ROWS_END
}

// route_offsets: where the rows of every (source s, EP rank g, local expert
// l) cell of chunk c's table start. One row per (c, s, g):
//   send_off[cell] = the first row of those rows in source s's send buffer
//                    (destination rank, then local expert order);
//   recv_off[cell] = the first row of those rows in rank g's expert buffer:
//                    packed (padded = 0): expert l's rows follow expert
//                    l - 1's, sources in order; padded (capacity plans):
//                    local expert l owns rows l * padded .. (l + 1) * padded.
// A cell's count above `padded` (padded > 0) is corrupt routing (code 6).
extern "C" __global__ void moec_route_offsets(
    const int* __restrict__ p0_table, unsigned long long p0_table_len,
    int* __restrict__ p1_send_off, unsigned long long p1_send_off_len,
    int* __restrict__ p2_recv_off, unsigned long long p2_recv_off_len,
    long long group, long long max_local, long long padded,
    long long moec_rows,
    long long* __restrict__ moec_status)
{
    MOEC_ROWS_BEGIN
        const long long c = moec_row / (group * group);
        const long long s = (moec_row / group) % group;
        const long long g = moec_row % group;
        const long long base = c * group * group * max_local;
        // Rows s sends to ranks before g.
        long long send = 0;
        for (long long g2 = 0; g2 < g; ++g2) {
            for (long long l = 0; l < max_local; ++l) {
                const long long cell = base + (s * group + g2) * max_local + l;
                MOEC_IN(0, p0_table_len, cell);
                send += p0_table[cell];
            }
        }
        // Rows of rank g's experts before l (packed), over every source.
        long long before_expert = 0;
        for (long long l = 0; l < max_local; ++l) {
            long long from_earlier_sources = 0;
            long long expert_rows = 0;
            for (long long s2 = 0; s2 < group; ++s2) {
                const long long cell = base + (s2 * group + g) * max_local + l;
                MOEC_IN(0, p0_table_len, cell);
                const long long n = p0_table[cell];
                if (n < 0) { moec_native_fail(moec_status, 6, s2, n, moec_row); return; }
                if (s2 < s) from_earlier_sources += n;
                expert_rows += n;
            }
            if (padded > 0 && expert_rows > padded) {
                moec_native_fail(moec_status, 6, g, expert_rows, moec_row);
                return;
            }
            const long long cell = base + (s * group + g) * max_local + l;
            MOEC_IN(1, p1_send_off_len, cell);
            MOEC_IN(2, p2_recv_off_len, cell);
            p1_send_off[cell] = (int)send;
            const long long first = padded > 0 ? l * padded : before_expert;
            p2_recv_off[cell] = (int)(first + from_earlier_sources);
            send += p0_table[cell];
            before_expert += expert_rows;
        }
    MOEC_ROWS_END
}

// assign_expand (dispatch by rank, pass 3): where the by-rank rows one
// chunk received go on the expert side, as cpu::layout::expand_index lays
// them out (a test checks it against that function). `picks` is the pick
// rows that arrived with the rows (2k ints each: the local expert of each
// pick j that lands here or -1, then the k weights' bits); `frame` holds,
// per chunk, its routing table as the host has it (cuda::route::expand_frame,
// 2G + 2G * max_local ints from chunk * that): per source s, its first
// received row and its row count, then per (source s, local expert l), the
// first expert-side row and the row count.
// One row per (s, l): it walks source s's rows in order and gives the picks
// of local expert l consecutive expert-side rows in index[row * k + j],
// their weights in weights[row * k + j]; row (s, 0) also marks the picks
// that land nowhere here (-1, weight 0). A pick beyond the table, or picks
// whose count disagrees with the table's, are corrupt metadata from s
// (code 6: [1] s, [2] the local expert).
extern "C" __global__ void moec_assign_expand(
    const int* __restrict__ p0_picks, unsigned long long p0_picks_len,
    const int* __restrict__ p1_frame, unsigned long long p1_frame_len,
    int* __restrict__ p2_index, unsigned long long p2_index_len,
    float* __restrict__ p3_weights, unsigned long long p3_weights_len,
    long long group, long long max_local, long long top_k, long long chunk,
    long long moec_rows,
    long long* __restrict__ moec_status)
{
    MOEC_ROWS_BEGIN
        const long long s = moec_row / max_local;
        const long long l = moec_row % max_local;
        const long long cols = 2 * top_k;
        const long long base = chunk * (2 * group + 2 * group * max_local);
        const long long cell = base + 2 * group + 2 * (s * max_local + l);
        MOEC_IN(1, p1_frame_len, base + 2 * s + 1);
        MOEC_IN(1, p1_frame_len, cell + 1);
        const long long start = p1_frame[base + 2 * s];
        const long long rows = p1_frame[base + 2 * s + 1];
        const long long first = p1_frame[cell];
        const long long want = p1_frame[cell + 1];
        long long cursor = 0;
        for (long long r = start; r < start + rows; ++r) {
            for (long long j = 0; j < top_k; ++j) {
                MOEC_IN(0, p0_picks_len, r * cols + j);
                const long long v = p0_picks[r * cols + j];
                const long long o = r * top_k + j;
                if (v < 0) {
                    if (l == 0) {
                        MOEC_IN(2, p2_index_len, o);
                        MOEC_IN(3, p3_weights_len, o);
                        p2_index[o] = -1;
                        p3_weights[o] = 0.0f;
                    }
                    continue;
                }
                if (v >= max_local) {
                    if (l == 0) { moec_native_fail(moec_status, 6, s, v, moec_row); return; }
                    continue;
                }
                if (v != l) continue;
                if (cursor >= want) { moec_native_fail(moec_status, 6, s, l, moec_row); return; }
                MOEC_IN(0, p0_picks_len, r * cols + top_k + j);
                MOEC_IN(2, p2_index_len, o);
                MOEC_IN(3, p3_weights_len, o);
                p2_index[o] = (int)(first + cursor);
                p3_weights[o] = __uint_as_float((unsigned int)p0_picks[r * cols + top_k + j]);
                ++cursor;
            }
        }
        if (cursor != want) { moec_native_fail(moec_status, 6, s, l, moec_row); return; }
    MOEC_ROWS_END
}

// 16 bytes, for copies of aligned rows.
struct moec_u128 {
    unsigned long long lo, hi;
};

// Copies `bytes` bytes from src + from to dst + to over the threads of one
// block: 16-byte words when everything is 16-byte aligned, 4-byte words when
// 4-byte aligned, bytes otherwise. Bounds are checked by the caller.
static __device__ __forceinline__ void moec_block_copy(
    unsigned char* __restrict__ dst, const unsigned char* __restrict__ src, long long bytes)
{
    const unsigned long long align =
        (unsigned long long)dst | (unsigned long long)src | (unsigned long long)bytes;
    if ((align & 15ull) == 0) {
        moec_u128* d = (moec_u128*)dst;
        const moec_u128* s = (const moec_u128*)src;
        for (long long w = threadIdx.x; w < bytes / 16; w += blockDim.x) d[w] = s[w];
    } else if ((align & 3ull) == 0) {
        unsigned int* d = (unsigned int*)dst;
        const unsigned int* s = (const unsigned int*)src;
        for (long long w = threadIdx.x; w < bytes / 4; w += blockDim.x) d[w] = s[w];
    } else {
        for (long long w = threadIdx.x; w < bytes; w += blockDim.x) dst[w] = src[w];
    }
}

// route_copy: one rank's share of an all-to-all between virtual ranks of one
// GPU, pulled by the receiving rank `me` from one peer, by the routing table
// and the offsets of route_offsets (this rank's copies; every rank of the
// group holds the same). dispatch = 1: the rows `peer` sends to `me`, from
// the peer's send buffer (src) into this rank's expert buffer (dst);
// dispatch = 0 (combine): the rows `me` sent to `peer`, back from the
// peer's expert buffer (src) into this rank's send-ordered buffer (dst).
// A row is `row_bytes` bytes; with scale_bytes > 0 (fp8) each row's scales
// follow too, at byte offsets src_scales / dst_scales + row * scale_bytes.
// Rows: units (l, i) = (moec_row / unit_rows, moec_row % unit_rows), the
// i-th row of local expert l, skipped when i is past the cell's count; one
// block per unit at a time (a grid-stride loop over blocks), its threads
// copying the row's bytes.
extern "C" __global__ void moec_route_copy(
    const unsigned char* __restrict__ p0_src, unsigned long long p0_src_len,
    unsigned char* __restrict__ p1_dst, unsigned long long p1_dst_len,
    const int* __restrict__ p2_table, unsigned long long p2_table_len,
    const int* __restrict__ p3_send_off, unsigned long long p3_send_off_len,
    const int* __restrict__ p4_recv_off, unsigned long long p4_recv_off_len,
    long long group, long long me, long long peer, long long chunk, long long max_local,
    long long dispatch, long long unit_rows, long long row_bytes, long long scale_bytes,
    long long src_scales, long long dst_scales,
    long long moec_rows,
    long long* __restrict__ moec_status)
{
    const long long s = dispatch ? peer : me;
    const long long g = dispatch ? me : peer;
    for (long long moec_row = blockIdx.x; moec_row < moec_rows; moec_row += gridDim.x) {
        const long long l = moec_row / unit_rows;
        const long long i = moec_row % unit_rows;
        const long long cell = ((chunk * group + s) * group + g) * max_local + l;
        MOEC_IN(2, p2_table_len, cell);
        if (i >= (long long)p2_table[cell]) continue;
        MOEC_IN(3, p3_send_off_len, cell);
        MOEC_IN(4, p4_recv_off_len, cell);
        const long long send_row = (long long)p3_send_off[cell] + i;
        const long long expert_row = (long long)p4_recv_off[cell] + i;
        const long long from = dispatch ? send_row : expert_row;
        const long long to = dispatch ? expert_row : send_row;
        MOEC_IN(0, p0_src_len, (from + 1) * row_bytes - 1);
        MOEC_IN(1, p1_dst_len, (to + 1) * row_bytes - 1);
        moec_block_copy(p1_dst + to * row_bytes, p0_src + from * row_bytes, row_bytes);
        if (scale_bytes > 0) {
            MOEC_IN(0, p0_src_len, src_scales + (from + 1) * scale_bytes - 1);
            MOEC_IN(1, p1_dst_len, dst_scales + (to + 1) * scale_bytes - 1);
            moec_block_copy(p1_dst + dst_scales + to * scale_bytes,
                            p0_src + src_scales + from * scale_bytes, scale_bytes);
        }
    }
}

// copy_runs: byte runs of one buffer into another, one run per row:
// runs[3 * moec_row .. + 3] = (source byte offset, destination byte offset,
// bytes). The hierarchical all-to-all's legs over NCCL pack a peer's rows
// into one message with it, and unpack a message into the rows it fills.
// One block per run at a time (a grid-stride loop over blocks), its threads
// copying the bytes.
extern "C" __global__ void moec_copy_runs(
    const unsigned char* __restrict__ p0_src, unsigned long long p0_src_len,
    unsigned char* __restrict__ p1_dst, unsigned long long p1_dst_len,
    const int* __restrict__ p2_runs, unsigned long long p2_runs_len,
    long long moec_rows,
    long long* __restrict__ moec_status)
{
    for (long long moec_row = blockIdx.x; moec_row < moec_rows; moec_row += gridDim.x) {
        MOEC_IN(2, p2_runs_len, 3 * moec_row + 2);
        const long long from = p2_runs[3 * moec_row];
        const long long to = p2_runs[3 * moec_row + 1];
        const long long bytes = p2_runs[3 * moec_row + 2];
        if (bytes <= 0) continue;
        MOEC_IN(0, p0_src_len, from);
        MOEC_IN(0, p0_src_len, from + bytes - 1);
        MOEC_IN(1, p1_dst_len, to);
        MOEC_IN(1, p1_dst_len, to + bytes - 1);
        moec_block_copy(p1_dst + to, p0_src + from, bytes);
    }
}
