/* The ledger's per-transfer hashing in compiled code: entry hashes, chain links, Merkle levels, ids.
 *
 * Every function computes exactly what its pure-Python twin in
 * services/ledger/domain/hashing.py computes (the tests compare them on
 * random inputs); this module only removes the interpreter's cost per call,
 * which for the ledger's short messages is several times the cost of the
 * hashing itself. SHA-256 is the standard one (FIPS 180-4), with the CPU's
 * SHA extensions where it has them (checked once, at import) and portable C
 * otherwise. Nothing here keeps state between calls.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define P2P_X86 1
#include <cpuid.h>
#include <immintrin.h>
#endif

/* ------------------------------------------------------------------ SHA-256 */

static const uint32_t K256[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

static const uint32_t H256[8] = {
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
};

#define ROTR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

static void blocks_portable(uint32_t state[8], const uint8_t *data, size_t blocks)
{
    uint32_t w[64];
    while (blocks--) {
        for (int i = 0; i < 16; i++) {
            w[i] = ((uint32_t)data[4 * i] << 24) | ((uint32_t)data[4 * i + 1] << 16) |
                   ((uint32_t)data[4 * i + 2] << 8) | (uint32_t)data[4 * i + 3];
        }
        for (int i = 16; i < 64; i++) {
            uint32_t s0 = ROTR(w[i - 15], 7) ^ ROTR(w[i - 15], 18) ^ (w[i - 15] >> 3);
            uint32_t s1 = ROTR(w[i - 2], 17) ^ ROTR(w[i - 2], 19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16] + s0 + w[i - 7] + s1;
        }
        uint32_t a = state[0], b = state[1], c = state[2], d = state[3];
        uint32_t e = state[4], f = state[5], g = state[6], h = state[7];
        for (int i = 0; i < 64; i++) {
            uint32_t t1 = h + (ROTR(e, 6) ^ ROTR(e, 11) ^ ROTR(e, 25)) + ((e & f) ^ (~e & g)) + K256[i] + w[i];
            uint32_t t2 = (ROTR(a, 2) ^ ROTR(a, 13) ^ ROTR(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
            h = g;
            g = f;
            f = e;
            e = d + t1;
            d = c;
            c = b;
            b = a;
            a = t1 + t2;
        }
        state[0] += a;
        state[1] += b;
        state[2] += c;
        state[3] += d;
        state[4] += e;
        state[5] += f;
        state[6] += g;
        state[7] += h;
        data += 64;
    }
}

#ifdef P2P_X86
/* The SHA extensions' compression: four rounds per step, the message schedule in four registers. */
__attribute__((target("sha,sse4.1,ssse3"))) static void blocks_sha_ni(uint32_t state[8], const uint8_t *data,
                                                                       size_t blocks)
{
    const __m128i byteswap = _mm_set_epi64x(0x0c0d0e0f08090a0bULL, 0x0405060700010203ULL);
    __m128i tmp = _mm_loadu_si128((const __m128i *)&state[0]);
    __m128i state1 = _mm_loadu_si128((const __m128i *)&state[4]);
    tmp = _mm_shuffle_epi32(tmp, 0xB1);          /* CDAB */
    state1 = _mm_shuffle_epi32(state1, 0x1B);    /* EFGH */
    __m128i state0 = _mm_alignr_epi8(tmp, state1, 8); /* ABEF */
    state1 = _mm_blend_epi16(state1, tmp, 0xF0);      /* CDGH */

    while (blocks--) {
        __m128i abef = state0, cdgh = state1;
        __m128i w[4];
#pragma GCC unroll 16
        for (int i = 0; i < 16; i++) {
            if (i < 4) {
                w[i] = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(data + 16 * i)), byteswap);
            }
            __m128i msg = _mm_add_epi32(w[i & 3], _mm_loadu_si128((const __m128i *)&K256[4 * i]));
            state1 = _mm_sha256rnds2_epu32(state1, state0, msg);
            if (i >= 3 && i <= 14) {
                __m128i t = _mm_alignr_epi8(w[i & 3], w[(i - 1) & 3], 4);
                w[(i + 1) & 3] = _mm_add_epi32(w[(i + 1) & 3], t);
                w[(i + 1) & 3] = _mm_sha256msg2_epu32(w[(i + 1) & 3], w[i & 3]);
            }
            msg = _mm_shuffle_epi32(msg, 0x0E);
            state0 = _mm_sha256rnds2_epu32(state0, state1, msg);
            if (i >= 1 && i <= 12) {
                w[(i - 1) & 3] = _mm_sha256msg1_epu32(w[(i - 1) & 3], w[i & 3]);
            }
        }
        state0 = _mm_add_epi32(state0, abef);
        state1 = _mm_add_epi32(state1, cdgh);
        data += 64;
    }

    tmp = _mm_shuffle_epi32(state0, 0x1B);       /* FEBA */
    state1 = _mm_shuffle_epi32(state1, 0xB1);    /* DCHG */
    state0 = _mm_blend_epi16(tmp, state1, 0xF0); /* DCBA */
    state1 = _mm_alignr_epi8(state1, tmp, 8);    /* ABEF */
    _mm_storeu_si128((__m128i *)&state[0], state0);
    _mm_storeu_si128((__m128i *)&state[4], state1);
}

static int cpu_has_sha(void)
{
    unsigned int a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) {
        return 0;
    }
    int sha = (b >> 29) & 1;
    if (!__get_cpuid(1, &a, &b, &c, &d)) {
        return 0;
    }
    int ssse3 = (c >> 9) & 1, sse41 = (c >> 19) & 1;
    return sha && ssse3 && sse41;
}
#endif

typedef void (*blocks_fn)(uint32_t state[8], const uint8_t *data, size_t blocks);
static blocks_fn compress = blocks_portable;
static const char *implementation = "portable C";

/* SHA-256 of `prefix` (0 to 63 bytes, may be NULL) followed by `data`, into `out`. */
static void sha256_two(const uint8_t *prefix, size_t prefix_len, const uint8_t *data, size_t len, uint8_t out[32])
{
    uint32_t state[8];
    memcpy(state, H256, sizeof state);
    uint8_t buffer[128];
    size_t total = prefix_len + len;
    size_t filled = prefix_len;
    if (prefix_len) {
        memcpy(buffer, prefix, prefix_len);
    }
    if (filled) {
        size_t take = 64 - filled < len ? 64 - filled : len;
        memcpy(buffer + filled, data, take);
        filled += take;
        data += take;
        len -= take;
        if (filled == 64) {
            compress(state, buffer, 1);
            filled = 0;
        }
    }
    if (len >= 64) {
        size_t whole = len / 64;
        compress(state, data, whole);
        data += whole * 64;
        len -= whole * 64;
    }
    if (len) {
        memcpy(buffer + filled, data, len);
        filled += len;
    }
    /* Padding: 0x80, zeros, the length in bits as a big-endian 64-bit integer. */
    buffer[filled++] = 0x80;
    size_t end = filled <= 56 ? 64 : 128;
    memset(buffer + filled, 0, end - filled);
    uint64_t bits = (uint64_t)total * 8;
    for (int i = 0; i < 8; i++) {
        buffer[end - 1 - i] = (uint8_t)(bits >> (8 * i));
    }
    compress(state, buffer, end / 64);
    for (int i = 0; i < 8; i++) {
        out[4 * i] = (uint8_t)(state[i] >> 24);
        out[4 * i + 1] = (uint8_t)(state[i] >> 16);
        out[4 * i + 2] = (uint8_t)(state[i] >> 8);
        out[4 * i + 3] = (uint8_t)state[i];
    }
}

/* ------------------------------------------------------------------ helpers */

typedef struct {
    char *data;
    size_t len, cap;
    char small[4096];
} Buffer;

static void buffer_init(Buffer *b)
{
    b->data = b->small;
    b->len = 0;
    b->cap = sizeof b->small;
}

static void buffer_free(Buffer *b)
{
    if (b->data != b->small) {
        PyMem_Free(b->data);
    }
}

static int buffer_put(Buffer *b, const char *s, size_t n)
{
    if (b->len + n > b->cap) {
        size_t cap = (b->len + n) * 2;
        char *grown = PyMem_Malloc(cap);
        if (grown == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        memcpy(grown, b->data, b->len);
        buffer_free(b);
        b->data = grown;
        b->cap = cap;
    }
    memcpy(b->data + b->len, s, n);
    b->len += n;
    return 0;
}

/* Append the decimal digits of `v`, as str() writes them. */
static int buffer_put_int(Buffer *b, long long v)
{
    char digits[24];
    char *end = digits + sizeof digits, *p = end;
    unsigned long long u = v < 0 ? 0ULL - (unsigned long long)v : (unsigned long long)v;
    do {
        *--p = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    if (v < 0) {
        *--p = '-';
    }
    return buffer_put(b, p, (size_t)(end - p));
}

/* Append the digits of the int `value` (any int, its subclasses included); `error` if beyond 64 bits. */
static int buffer_put_long(Buffer *b, PyObject *value, PyObject *error)
{
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(value, &overflow);
    if (overflow || (v == -1 && PyErr_Occurred())) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(error, "an integer beyond 64 bits");
        }
        return -1;
    }
    return buffer_put_int(b, v);
}

/* Append str(value) for a str or an int (exactly as Python writes it); anything else is a TypeError. */
static int buffer_put_field(Buffer *b, PyObject *value)
{
    if (PyUnicode_Check(value)) {
        Py_ssize_t n;
        const char *s = PyUnicode_AsUTF8AndSize(value, &n);
        if (s == NULL) {
            return -1;
        }
        return buffer_put(b, s, (size_t)n);
    }
    if (PyLong_CheckExact(value)) {
        return buffer_put_long(b, value, PyExc_OverflowError);
    }
    PyErr_Format(PyExc_TypeError, "a transfer field is a %.100s, not a str or an int", Py_TYPE(value)->tp_name);
    return -1;
}

static const char ENTRY_PREFIX[] = "\x00p2pgrid-transfer-v1|";
#define ENTRY_PREFIX_LEN (sizeof ENTRY_PREFIX - 1)
#define TRANSFER_FIELDS 8

/* ------------------------------------------------------------------ functions */

PyDoc_STRVAR(sha256_doc, "sha256(data, /) -> bytes\n\nThe SHA-256 digest of `data`.");

static PyObject *native_sha256(PyObject *Py_UNUSED(self), PyObject *arg)
{
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    uint8_t out[32];
    Py_BEGIN_ALLOW_THREADS;
    sha256_two(NULL, 0, view.buf, (size_t)view.len, out);
    Py_END_ALLOW_THREADS;
    PyBuffer_Release(&view);
    return PyBytes_FromStringAndSize((const char *)out, 32);
}

PyDoc_STRVAR(leaves_and_heads_doc,
             "leaves_and_heads(transfers, previous, /) -> (bytes, bytes)\n\n"
             "The entry hashes of `transfers` (sequences of 8 str or int fields) and their chained hashes\n"
             "after the chained hash `previous`, each as one byte string of 32-byte hashes.");

static PyObject *native_leaves_and_heads(PyObject *Py_UNUSED(self), PyObject *args)
{
    PyObject *transfers;
    Py_buffer previous;
    if (!PyArg_ParseTuple(args, "Oy*:leaves_and_heads", &transfers, &previous)) {
        return NULL;
    }
    PyObject *result = NULL, *leaves = NULL, *heads = NULL, *seq = NULL;
    size_t *ends = NULL;
    Buffer entries;
    buffer_init(&entries);
    if (previous.len != 32) {
        PyErr_SetString(PyExc_ValueError, "the previous chained hash must be 32 bytes");
        goto done;
    }
    seq = PySequence_Fast(transfers, "transfers must be a sequence");
    if (seq == NULL) {
        goto done;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    ends = PyMem_Malloc(sizeof(size_t) * (size_t)(n + 1));
    leaves = PyBytes_FromStringAndSize(NULL, n * 32);
    heads = PyBytes_FromStringAndSize(NULL, n * 32);
    if (ends == NULL || leaves == NULL || heads == NULL) {
        if (!PyErr_Occurred()) {
            PyErr_NoMemory();
        }
        goto done;
    }
    /* Every entry is written out first, with the GIL; then hashed without it. */
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *t = PySequence_Fast_GET_ITEM(seq, i);
        if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != TRANSFER_FIELDS) {
            PyErr_SetString(PyExc_TypeError, "a transfer must be a tuple of 8 fields");
            goto done;
        }
        if (buffer_put(&entries, ENTRY_PREFIX, ENTRY_PREFIX_LEN) < 0) {
            goto done;
        }
        for (int f = 0; f < TRANSFER_FIELDS; f++) {
            if ((f && buffer_put(&entries, "|", 1) < 0) ||
                buffer_put_field(&entries, PyTuple_GET_ITEM(t, f)) < 0) {
                goto done;
            }
        }
        ends[i] = entries.len;
    }
    uint8_t *leaf = (uint8_t *)PyBytes_AS_STRING(leaves);
    uint8_t *head = (uint8_t *)PyBytes_AS_STRING(heads);
    const uint8_t *text = (const uint8_t *)entries.data;
    const uint8_t *before = previous.buf;
    Py_BEGIN_ALLOW_THREADS;
    size_t start = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        sha256_two(NULL, 0, text + start, ends[i] - start, leaf + 32 * i);
        sha256_two(before, 32, leaf + 32 * i, 32, head + 32 * i);
        before = head + 32 * i;
        start = ends[i];
    }
    Py_END_ALLOW_THREADS;
    result = PyTuple_Pack(2, leaves, heads);
done:
    buffer_free(&entries);
    PyMem_Free(ends);
    Py_XDECREF(seq);
    Py_XDECREF(leaves);
    Py_XDECREF(heads);
    PyBuffer_Release(&previous);
    return result;
}

PyDoc_STRVAR(pair_up_doc,
             "pair_up(nodes, /) -> bytes\n\n"
             "`nodes` (32-byte hashes, one after another) hashed two by two into the next Merkle level,\n"
             "SHA-256(0x01 || left || right); an odd last node is left out.");

static PyObject *native_pair_up(PyObject *Py_UNUSED(self), PyObject *arg)
{
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    if (view.len % 32) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "nodes must be a whole number of 32-byte hashes");
        return NULL;
    }
    Py_ssize_t pairs = view.len / 64;
    PyObject *out = PyBytes_FromStringAndSize(NULL, pairs * 32);
    if (out != NULL) {
        uint8_t *parent = (uint8_t *)PyBytes_AS_STRING(out);
        const uint8_t *node = view.buf;
        static const uint8_t one = 0x01;
        Py_BEGIN_ALLOW_THREADS;
        for (Py_ssize_t i = 0; i < pairs; i++) {
            sha256_two(&one, 1, node + 64 * i, 64, parent + 32 * i);
        }
        Py_END_ALLOW_THREADS;
    }
    PyBuffer_Release(&view);
    return out;
}

PyDoc_STRVAR(short_hex_digests_doc,
             "short_hex_digests(messages, digits, /) -> list[str]\n\n"
             "The first `digits` (at most 64) hex digits of the SHA-256 of each str's UTF-8 encoding.");

static PyObject *native_short_hex_digests(PyObject *Py_UNUSED(self), PyObject *args)
{
    PyObject *messages;
    int digits;
    if (!PyArg_ParseTuple(args, "Oi:short_hex_digests", &messages, &digits)) {
        return NULL;
    }
    if (digits < 0 || digits > 64) {
        PyErr_SetString(PyExc_ValueError, "digits must be between 0 and 64");
        return NULL;
    }
    PyObject *seq = PySequence_Fast(messages, "messages must be a sequence");
    if (seq == NULL) {
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject *out = PyList_New(n);
    static const char hex[] = "0123456789abcdef";
    for (Py_ssize_t i = 0; out != NULL && i < n; i++) {
        PyObject *m = PySequence_Fast_GET_ITEM(seq, i);
        Py_ssize_t len;
        const char *s = PyUnicode_Check(m) ? PyUnicode_AsUTF8AndSize(m, &len) : NULL;
        if (s == NULL) {
            if (!PyErr_Occurred()) {
                PyErr_SetString(PyExc_TypeError, "each message must be a str");
            }
            Py_CLEAR(out);
            break;
        }
        uint8_t digest[32];
        sha256_two(NULL, 0, (const uint8_t *)s, (size_t)len, digest);
        PyObject *text = PyUnicode_New(digits, 127);
        if (text == NULL) {
            Py_CLEAR(out);
            break;
        }
        Py_UCS1 *chars = PyUnicode_1BYTE_DATA(text);
        for (int d = 0; d < digits; d++) {
            chars[d] = (Py_UCS1)hex[(digest[d >> 1] >> ((d & 1) ? 0 : 4)) & 15];
        }
        PyList_SET_ITEM(out, i, text);
    }
    Py_DECREF(seq);
    return out;
}


/* ------------------------------------------------------------------ first settlement */

static PyObject *zero_int; /* 0, made at import */

typedef struct {
    PyObject *transfer_type; /* the Transfer named tuple */
    PyObject *out;           /* list of transfers */
    PyObject *group;         /* linked group: the first transfer's id, or NULL */
    PyObject *start_s;
    PyObject *limit;
    PyObject *error_type;
} Legs;

/* Book one leg as `leg()` in services/ledger/domain/settlement.py does: nothing for 0, payer and payee
 * swapped for a negative amount, an error above the limit; the first transfer's id is the group. */
static int book(Legs *legs, PyObject *stem, PyObject *tag, PyObject *payer, PyObject *payee, PyObject *amount,
                PyObject *code, long flags)
{
    int sign = PyObject_RichCompareBool(amount, zero_int, Py_GT);
    if (sign < 0) {
        return -1;
    }
    PyObject *positive;
    if (sign) {
        positive = Py_NewRef(amount);
    } else {
        int zero = PyObject_RichCompareBool(amount, zero_int, Py_EQ);
        if (zero) {
            return zero < 0 ? -1 : 0;
        }
        positive = PyNumber_Negative(amount);
        if (positive == NULL) {
            return -1;
        }
        PyObject *swap = payer;
        payer = payee;
        payee = swap;
    }
    PyObject *tid = PyUnicode_Concat(stem, tag);
    if (tid == NULL) {
        Py_DECREF(positive);
        return -1;
    }
    int over = PyObject_RichCompareBool(positive, legs->limit, Py_GT);
    if (over) {
        if (over > 0) {
            PyErr_Format(legs->error_type, "leg %S %S: amount %S nano exceeds one transfer's limit", code, tid,
                         positive);
        }
        Py_DECREF(tid);
        Py_DECREF(positive);
        return -1;
    }
    if (legs->group == NULL) {
        legs->group = Py_NewRef(tid);
    }
    PyTypeObject *type = (PyTypeObject *)legs->transfer_type;
    PyObject *t = type->tp_alloc(type, TRANSFER_FIELDS);
    PyObject *flags_obj = PyLong_FromLong(flags);
    if (t == NULL || flags_obj == NULL) {
        Py_XDECREF(t);
        Py_XDECREF(flags_obj);
        Py_DECREF(tid);
        Py_DECREF(positive);
        return -1;
    }
    PyTuple_SET_ITEM(t, 0, tid);
    PyTuple_SET_ITEM(t, 1, Py_NewRef(payer));
    PyTuple_SET_ITEM(t, 2, Py_NewRef(payee));
    PyTuple_SET_ITEM(t, 3, positive);
    PyTuple_SET_ITEM(t, 4, Py_NewRef(code));
    PyTuple_SET_ITEM(t, 5, Py_NewRef(legs->start_s));
    PyTuple_SET_ITEM(t, 6, Py_NewRef(legs->group));
    PyTuple_SET_ITEM(t, 7, flags_obj);
    int status = PyList_Append(legs->out, t);
    Py_DECREF(t);
    return status;
}

/* dict[key], or fallback(*args) stored as dict[key] when missing; a new reference. */
static PyObject *cached(PyObject *dict, PyObject *key, PyObject *fallback, PyObject *args)
{
    PyObject *found = PyDict_GetItemWithError(dict, key);
    if (found != NULL) {
        return Py_NewRef(found);
    }
    if (PyErr_Occurred()) {
        return NULL;
    }
    found = PyObject_CallObject(fallback, args);
    if (found != NULL && PyDict_SetItem(dict, key, found) < 0) {
        Py_CLEAR(found);
    }
    return found;
}

static PyObject *account(PyObject *accounts, PyObject *account_of, PyObject *participant)
{
    PyObject *found = PyDict_GetItemWithError(accounts, participant);
    if (found != NULL) {
        return Py_NewRef(found);
    }
    if (PyErr_Occurred()) {
        return NULL;
    }
    return PyObject_CallOneArg(account_of, participant);
}

PyDoc_STRVAR(first_settlement_transfers_doc,
             "first_settlement_transfers(order, transfer_type, start_s, limit, error_type, accounts, account_of,\n"
             "    fee_rates, fee_rate, prices, state, measured, fee_by_buyer, market, grid, utility, codes, tags,\n"
             "    estimated_flag, /) -> list\n\n"
             "The transfers of a first settlement from its sorted `order` of (id stem, kind, parties, amount),\n"
             "exactly as the loop in services/ledger/domain/settlement.py first_settlement_chunks makes them.");

static PyObject *native_first_settlement_transfers(PyObject *Py_UNUSED(self), PyObject *args)
{
    PyObject *order, *accounts, *account_of, *fee_rates, *fee_rate, *prices, *state, *measured;
    PyObject *market, *grid, *utility, *codes, *tags;
    int fee_by_buyer;
    long estimated_flag;
    Legs legs = {0};
    if (!PyArg_ParseTuple(args, "O!OOOOO!OO!OO!O!OpOOOO!O!l:first_settlement_transfers", &PyList_Type, &order,
                          &legs.transfer_type, &legs.start_s, &legs.limit, &legs.error_type, &PyDict_Type, &accounts,
                          &account_of, &PyDict_Type, &fee_rates, &fee_rate, &PyDict_Type, &prices, &PyDict_Type,
                          &state, &measured, &fee_by_buyer, &market, &grid, &utility, &PyTuple_Type, &codes,
                          &PyTuple_Type, &tags, &estimated_flag)) {
        return NULL;
    }
    if (!PyType_Check(legs.transfer_type) ||
        !PyType_IsSubtype((PyTypeObject *)legs.transfer_type, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "transfer_type must be a tuple type");
        return NULL;
    }
    if (PyTuple_GET_SIZE(codes) != 5 || PyTuple_GET_SIZE(tags) != 5) {
        PyErr_SetString(PyExc_ValueError, "codes and tags: grid fee, purchase, sale, deviation, congestion rent");
        return NULL;
    }
    PyObject *code_fee = PyTuple_GET_ITEM(codes, 0), *code_purchase = PyTuple_GET_ITEM(codes, 1);
    PyObject *code_sale = PyTuple_GET_ITEM(codes, 2), *code_deviation = PyTuple_GET_ITEM(codes, 3);
    PyObject *code_rent = PyTuple_GET_ITEM(codes, 4);
    PyObject *tag_fee = PyTuple_GET_ITEM(tags, 0), *tag_purchase = PyTuple_GET_ITEM(tags, 1);
    PyObject *tag_sale = PyTuple_GET_ITEM(tags, 2), *tag_deviation = PyTuple_GET_ITEM(tags, 3);
    PyObject *tag_rent = PyTuple_GET_ITEM(tags, 4);
    legs.out = PyList_New(0);
    if (legs.out == NULL) {
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(order);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *entry = PyList_GET_ITEM(order, i);
        if (!PyTuple_Check(entry) || PyTuple_GET_SIZE(entry) != 4) {
            PyErr_SetString(PyExc_TypeError, "an order entry is (stem, kind, parties, amount)");
            goto fail;
        }
        PyObject *stem = PyTuple_GET_ITEM(entry, 0), *what = PyTuple_GET_ITEM(entry, 2);
        PyObject *amount = PyTuple_GET_ITEM(entry, 3);
        long kind = PyLong_AsLong(PyTuple_GET_ITEM(entry, 1));
        if (kind == -1 && PyErr_Occurred()) {
            goto fail;
        }
        if (kind == 0) {
            if (!PyTuple_Check(what) || PyTuple_GET_SIZE(what) != 4) {
                PyErr_SetString(PyExc_TypeError, "a trade's parties are (buyer, buyer node, seller, seller node)");
                goto fail;
            }
            PyObject *buyer = PyTuple_GET_ITEM(what, 0), *buyer_node = PyTuple_GET_ITEM(what, 1);
            PyObject *seller = PyTuple_GET_ITEM(what, 2), *seller_node = PyTuple_GET_ITEM(what, 3);
            PyObject *buyer_account = account(accounts, account_of, buyer);
            PyObject *seller_account = buyer_account ? account(accounts, account_of, seller) : NULL;
            int ok = seller_account != NULL;
            if (ok) {
                PyObject *fee_account = fee_by_buyer ? buyer_account : seller_account;
                int pays = PyObject_RichCompareBool(fee_account, utility, Py_NE);
                ok = pays >= 0;
                if (ok && pays) {
                    PyObject *nodes = PyTuple_Pack(2, buyer_node, seller_node);
                    PyObject *rate = nodes ? cached(fee_rates, nodes, fee_rate, nodes) : NULL;
                    PyObject *fee = rate ? PyNumber_Multiply(amount, rate) : NULL;
                    ok = fee != NULL && book(&legs, stem, tag_fee, fee_account, grid, fee, code_fee, 0) == 0;
                    Py_XDECREF(nodes);
                    Py_XDECREF(rate);
                    Py_XDECREF(fee);
                }
            }
            for (int side = 0; ok && side < 2; side++) {
                PyObject *node = side ? seller_node : buyer_node;
                PyObject *price = PyDict_GetItemWithError(prices, node);
                if (price == NULL) {
                    if (!PyErr_Occurred()) {
                        PyErr_SetObject(PyExc_KeyError, node);
                    }
                    ok = 0;
                    break;
                }
                PyObject *value = PyNumber_Multiply(amount, price);
                ok = value != NULL &&
                     (side ? book(&legs, stem, tag_sale, market, seller_account, value, code_sale, 0)
                           : book(&legs, stem, tag_purchase, buyer_account, market, value, code_purchase, 0)) == 0;
                Py_XDECREF(value);
            }
            Py_XDECREF(buyer_account);
            Py_XDECREF(seller_account);
            if (!ok) {
                goto fail;
            }
        } else if (kind == 2) {
            PyObject *meter = PyDict_GetItemWithError(state, what);
            if (meter == NULL || !PyTuple_Check(meter) || PyTuple_GET_SIZE(meter) < 3) {
                if (!PyErr_Occurred()) {
                    PyErr_SetObject(PyExc_KeyError, what);
                }
                goto fail;
            }
            long flags = PyTuple_GET_ITEM(meter, 2) == measured ? 0 : estimated_flag;
            PyObject *payer = account(accounts, account_of, what);
            int ok = payer != NULL && book(&legs, stem, tag_deviation, payer, utility, amount, code_deviation, flags) == 0;
            Py_XDECREF(payer);
            if (!ok) {
                goto fail;
            }
        } else if (book(&legs, stem, tag_rent, market, grid, amount, code_rent, 0) < 0) {
            goto fail;
        }
    }
    Py_XDECREF(legs.group);
    return legs.out;
fail:
    Py_XDECREF(legs.group);
    Py_DECREF(legs.out);
    return NULL;
}


/* ------------------------------------------------------------------ plain JSON */

/* Append `obj` as json.dumps(obj, separators=(",", ":")) writes it, for the values the ledger's
 * documents hold: dicts with str keys (in their order), lists and tuples, ints (bool as true/false)
 * and str made of printable ASCII without '"' or '\'. Anything else raises ValueError (the caller
 * then lets the json module write it). */
static int put_json(Buffer *b, PyObject *obj, int depth)
{
    if (depth > 64) {
        PyErr_SetString(PyExc_ValueError, "nested too deeply for plain JSON");
        return -1;
    }
    if (PyUnicode_Check(obj)) {
        if (!PyUnicode_IS_ASCII(obj)) {
            PyErr_SetString(PyExc_ValueError, "not plain JSON text");
            return -1;
        }
        Py_ssize_t n = PyUnicode_GET_LENGTH(obj);
        const char *text = (const char *)PyUnicode_1BYTE_DATA(obj);
        for (Py_ssize_t i = 0; i < n; i++) {
            if (text[i] < 0x20 || text[i] == 0x7f || text[i] == '"' || text[i] == '\\') {
                PyErr_SetString(PyExc_ValueError, "not plain JSON text");
                return -1;
            }
        }
        return buffer_put(b, "\"", 1) < 0 || buffer_put(b, text, (size_t)n) < 0 || buffer_put(b, "\"", 1) < 0 ? -1 : 0;
    }
    if (PyBool_Check(obj)) {
        return obj == Py_True ? buffer_put(b, "true", 4) : buffer_put(b, "false", 5);
    }
    if (PyLong_Check(obj)) {
        return buffer_put_long(b, obj, PyExc_ValueError);
    }
    if (PyList_Check(obj) || PyTuple_Check(obj)) {
        PyObject *seq = PySequence_Fast(obj, "");
        if (seq == NULL) {
            return -1;
        }
        Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
        int status = buffer_put(b, "[", 1);
        for (Py_ssize_t i = 0; status == 0 && i < n; i++) {
            status = (i && buffer_put(b, ",", 1) < 0) || put_json(b, PySequence_Fast_GET_ITEM(seq, i), depth + 1) < 0 ? -1 : 0;
        }
        Py_DECREF(seq);
        return status < 0 ? -1 : buffer_put(b, "]", 1);
    }
    if (PyDict_CheckExact(obj)) {
        Py_ssize_t pos = 0;
        PyObject *key, *value;
        int first = 1;
        if (buffer_put(b, "{", 1) < 0) {
            return -1;
        }
        while (PyDict_Next(obj, &pos, &key, &value)) {
            if (!PyUnicode_Check(key)) {
                PyErr_SetString(PyExc_ValueError, "a dict key that is not a str");
                return -1;
            }
            if ((!first && buffer_put(b, ",", 1) < 0) || put_json(b, key, depth + 1) < 0 || buffer_put(b, ":", 1) < 0 ||
                put_json(b, value, depth + 1) < 0) {
                return -1;
            }
            first = 0;
        }
        return buffer_put(b, "}", 1);
    }
    PyErr_Format(PyExc_ValueError, "a %.100s is not plain JSON", Py_TYPE(obj)->tp_name);
    return -1;
}

PyDoc_STRVAR(plain_json_doc,
             "plain_json(obj, /) -> bytes\n\n"
             "json.dumps(obj, separators=(\",\", \":\")).encode() for dicts with str keys, lists, tuples, ints\n"
             "of 64 bits and str of printable ASCII without '\"' or '\\\\'; ValueError for anything else.");

static PyObject *native_plain_json(PyObject *Py_UNUSED(self), PyObject *obj)
{
    Buffer b;
    buffer_init(&b);
    PyObject *result = put_json(&b, obj, 0) < 0 ? NULL : PyBytes_FromStringAndSize(b.data, (Py_ssize_t)b.len);
    buffer_free(&b);
    return result;
}

PyDoc_STRVAR(copy_rows_doc,
             "copy_rows(first_seq, transfers, /) -> bytes\n\n"
             "PostgreSQL COPY text rows of `transfers` numbered from `first_seq`: for each, its sequence number\n"
             "and its fields, as str() writes them, separated by tabs and ended by a newline (fields are not\n"
             "escaped: the caller passes only fields without tab, newline or backslash).");

static PyObject *native_copy_rows(PyObject *Py_UNUSED(self), PyObject *args)
{
    long long first_seq;
    PyObject *transfers;
    if (!PyArg_ParseTuple(args, "LO:copy_rows", &first_seq, &transfers)) {
        return NULL;
    }
    PyObject *seq = PySequence_Fast(transfers, "transfers must be a sequence");
    if (seq == NULL) {
        return NULL;
    }
    Buffer out;
    buffer_init(&out);
    PyObject *result = NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *t = PySequence_Fast_GET_ITEM(seq, i);
        if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != TRANSFER_FIELDS) {
            PyErr_SetString(PyExc_TypeError, "a transfer must be a tuple of 8 fields");
            goto done;
        }
        if (buffer_put_int(&out, first_seq + i) < 0) {
            goto done;
        }
        for (int f = 0; f < TRANSFER_FIELDS; f++) {
            if (buffer_put(&out, "\t", 1) < 0 || buffer_put_field(&out, PyTuple_GET_ITEM(t, f)) < 0) {
                goto done;
            }
        }
        if (buffer_put(&out, "\n", 1) < 0) {
            goto done;
        }
    }
    result = PyBytes_FromStringAndSize(out.data, (Py_ssize_t)out.len);
done:
    buffer_free(&out);
    Py_DECREF(seq);
    return result;
}

PyDoc_STRVAR(add_totals_doc,
             "add_totals(transfers, debited, credited, /) -> None\n\n"
             "For each transfer (a tuple whose fields 1, 2 and 3 are its debit account, credit account and\n"
             "amount), add the amount to debited[debit account] and credited[credit account] (from 0).");

static int add_to(PyObject *totals, PyObject *key, PyObject *amount)
{
    PyObject *before = PyDict_GetItemWithError(totals, key); /* borrowed */
    if (before == NULL) {
        if (PyErr_Occurred()) {
            return -1;
        }
        return PyDict_SetItem(totals, key, amount);
    }
    PyObject *after = PyNumber_Add(before, amount);
    if (after == NULL) {
        return -1;
    }
    int status = PyDict_SetItem(totals, key, after);
    Py_DECREF(after);
    return status;
}

static PyObject *native_add_totals(PyObject *Py_UNUSED(self), PyObject *args)
{
    PyObject *transfers, *debited, *credited;
    if (!PyArg_ParseTuple(args, "OO!O!:add_totals", &transfers, &PyDict_Type, &debited, &PyDict_Type, &credited)) {
        return NULL;
    }
    PyObject *seq = PySequence_Fast(transfers, "transfers must be a sequence");
    if (seq == NULL) {
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *t = PySequence_Fast_GET_ITEM(seq, i);
        if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) < 4) {
            PyErr_SetString(PyExc_TypeError, "a transfer must be a tuple of at least 4 fields");
            Py_DECREF(seq);
            return NULL;
        }
        PyObject *amount = PyTuple_GET_ITEM(t, 3);
        if (add_to(debited, PyTuple_GET_ITEM(t, 1), amount) < 0 ||
            add_to(credited, PyTuple_GET_ITEM(t, 2), amount) < 0) {
            Py_DECREF(seq);
            return NULL;
        }
    }
    Py_DECREF(seq);
    Py_RETURN_NONE;
}


/* ------------------------------------------------------------------ settlement input rows */

static PyObject *s_buyer_id, *s_buyer_node, *s_seller_id, *s_seller_node, *s_energy_wh;
static PyObject *s_participant_id, *s_bought_wh, *s_sold_wh, *s_import_wh, *s_export_wh, *s_quality;

/* An exact str matching [A-Za-z0-9._-]{1,100}: a participant's name. */
static int is_name(PyObject *o)
{
    if (!PyUnicode_CheckExact(o) || !PyUnicode_IS_ASCII(o)) {
        return 0;
    }
    Py_ssize_t n = PyUnicode_GET_LENGTH(o);
    if (n < 1 || n > 100) {
        return 0;
    }
    const unsigned char *c = PyUnicode_1BYTE_DATA(o);
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char ch = c[i];
        if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') || ch == '.' ||
              ch == '_' || ch == '-')) {
            return 0;
        }
    }
    return 1;
}

/* An exact int from low to high. */
static int int_within(PyObject *o, long long low, long long high)
{
    if (!PyLong_CheckExact(o)) {
        return 0;
    }
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (overflow || (v == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        return 0;
    }
    return v >= low && v <= high;
}

/* 1 when every row passes, 0 when one does not, -1 on an error; an error may be set either way
 * (the caller clears it). */
static int rows_pass(PyObject *trades, PyObject *accepted, PyObject *meters, PyObject *prices, long long max_wh,
                     PyObject *measured, PyObject *estimated)
{
    int verdict = -1;
    PyObject *bought = PyDict_New(), *sold = PyDict_New(), *seen = PySet_New(NULL), *metered = PySet_New(NULL);
    PyObject *t_seq = NULL, *a_seq = NULL, *m_seq = NULL;
    if (!bought || !sold || !seen || !metered) {
        goto done;
    }
    t_seq = PySequence_Fast(trades, "trades");
    a_seq = t_seq ? PySequence_Fast(accepted, "accepted") : NULL;
    m_seq = a_seq ? PySequence_Fast(meters, "meter energy") : NULL;
    if (!m_seq) {
        goto done;
    }
    verdict = 0;
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(t_seq); i++) {
        PyObject *t = PySequence_Fast_GET_ITEM(t_seq, i);
        PyObject *buyer = PyObject_GetAttr(t, s_buyer_id), *seller = PyObject_GetAttr(t, s_seller_id);
        PyObject *bn = PyObject_GetAttr(t, s_buyer_node), *sn = PyObject_GetAttr(t, s_seller_node);
        PyObject *wh = PyObject_GetAttr(t, s_energy_wh);
        int ok = buyer && seller && bn && sn && wh && is_name(buyer) && is_name(seller);
        if (ok) {
            int distinct = PyObject_RichCompareBool(buyer, seller, Py_NE);
            if (distinct == 0) {
                distinct = PyObject_RichCompareBool(bn, sn, Py_NE);
            }
            ok = distinct == 1 && PySequence_Contains(prices, bn) == 1 && PySequence_Contains(prices, sn) == 1 &&
                 int_within(wh, 1, max_wh);
        }
        if (ok) {
            ok = add_to(bought, buyer, wh) == 0 && add_to(sold, seller, wh) == 0;
        }
        Py_XDECREF(buyer);
        Py_XDECREF(seller);
        Py_XDECREF(bn);
        Py_XDECREF(sn);
        Py_XDECREF(wh);
        if (!ok) {
            goto done;
        }
    }
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(a_seq); i++) {
        PyObject *a = PySequence_Fast_GET_ITEM(a_seq, i);
        PyObject *pid = PyObject_GetAttr(a, s_participant_id), *b = PyObject_GetAttr(a, s_bought_wh);
        PyObject *so = PyObject_GetAttr(a, s_sold_wh);
        int ok = pid && b && so && is_name(pid) && PySet_Contains(seen, pid) == 0 && PyLong_CheckExact(b) &&
                 PyLong_CheckExact(so);
        if (ok) {
            PyObject *want_b = PyDict_GetItemWithError(bought, pid), *want_s = PyDict_GetItemWithError(sold, pid);
            ok = !PyErr_Occurred() &&
                 PyObject_RichCompareBool(b, want_b ? want_b : zero_int, Py_EQ) == 1 &&
                 PyObject_RichCompareBool(so, want_s ? want_s : zero_int, Py_EQ) == 1 && PySet_Add(seen, pid) == 0;
        }
        Py_XDECREF(pid);
        Py_XDECREF(b);
        Py_XDECREF(so);
        if (!ok) {
            goto done;
        }
    }
    /* Everyone who traded has an accepted row. */
    PyObject *key, *value;
    for (int side = 0; side < 2; side++) {
        Py_ssize_t pos = 0;
        while (PyDict_Next(side ? sold : bought, &pos, &key, &value)) {
            if (PySet_Contains(seen, key) != 1) {
                goto done;
            }
        }
    }
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(m_seq); i++) {
        PyObject *m = PySequence_Fast_GET_ITEM(m_seq, i);
        PyObject *pid = PyObject_GetAttr(m, s_participant_id), *im = PyObject_GetAttr(m, s_import_wh);
        PyObject *ex = PyObject_GetAttr(m, s_export_wh), *q = PyObject_GetAttr(m, s_quality);
        int ok = pid && im && ex && q && is_name(pid) && PySet_Contains(metered, pid) == 0 &&
                 int_within(im, 0, max_wh) && int_within(ex, 0, max_wh) && (q == measured || q == estimated) &&
                 PySet_Add(metered, pid) == 0;
        Py_XDECREF(pid);
        Py_XDECREF(im);
        Py_XDECREF(ex);
        Py_XDECREF(q);
        if (!ok) {
            goto done;
        }
    }
    verdict = 1;
done:
    Py_XDECREF(t_seq);
    Py_XDECREF(a_seq);
    Py_XDECREF(m_seq);
    Py_XDECREF(bought);
    Py_XDECREF(sold);
    Py_XDECREF(seen);
    Py_XDECREF(metered);
    return verdict;
}

PyDoc_STRVAR(settlement_rows_pass_doc,
             "settlement_rows_pass(trades, accepted, meter_energy, prices, max_energy_wh, measured, estimated, /)\n"
             "-> bool\n\n"
             "True when every row passes the checks of validate_rows in services/ledger/domain/settlement.py;\n"
             "False when one may not (validate_rows then finds and names it).");

static PyObject *native_settlement_rows_pass(PyObject *Py_UNUSED(self), PyObject *args)
{
    PyObject *trades, *accepted, *meters, *prices, *measured, *estimated;
    long long max_wh;
    if (!PyArg_ParseTuple(args, "OOOOLOO:settlement_rows_pass", &trades, &accepted, &meters, &prices, &max_wh,
                          &measured, &estimated)) {
        return NULL;
    }
    int verdict = rows_pass(trades, accepted, meters, prices, max_wh, measured, estimated);
    /* Whatever went wrong on the way (an attribute missing, an unhashable value) is for the Python
     * checks to find and name: here it only means the rows do not pass. */
    PyErr_Clear();
    return PyBool_FromLong(verdict == 1);
}

PyDoc_STRVAR(use_implementation_doc,
             "use_implementation(name, /) -> None\n\n"
             "Hash with \"portable C\" or \"SHA extensions\" from now on (for tests: both must agree).\n"
             "ValueError if this CPU or build has no such implementation.");

static PyObject *native_use_implementation(PyObject *Py_UNUSED(self), PyObject *arg)
{
    const char *name = PyUnicode_Check(arg) ? PyUnicode_AsUTF8(arg) : NULL;
    if (name == NULL) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, "the implementation's name must be a str");
        }
        return NULL;
    }
    if (strcmp(name, "portable C") == 0) {
        compress = blocks_portable;
        implementation = "portable C";
        Py_RETURN_NONE;
    }
#ifdef P2P_X86
    if (strcmp(name, "SHA extensions") == 0 && cpu_has_sha()) {
        compress = blocks_sha_ni;
        implementation = "SHA extensions";
        Py_RETURN_NONE;
    }
#endif
    PyErr_Format(PyExc_ValueError, "no SHA-256 implementation %R here", arg);
    return NULL;
}

static PyMethodDef methods[] = {
    {"use_implementation", native_use_implementation, METH_O, use_implementation_doc},
    {"add_totals", native_add_totals, METH_VARARGS, add_totals_doc},
    {"settlement_rows_pass", native_settlement_rows_pass, METH_VARARGS, settlement_rows_pass_doc},
    {"copy_rows", native_copy_rows, METH_VARARGS, copy_rows_doc},
    {"plain_json", native_plain_json, METH_O, plain_json_doc},
    {"first_settlement_transfers", native_first_settlement_transfers, METH_VARARGS, first_settlement_transfers_doc},
    {"sha256", native_sha256, METH_O, sha256_doc},
    {"leaves_and_heads", native_leaves_and_heads, METH_VARARGS, leaves_and_heads_doc},
    {"pair_up", native_pair_up, METH_O, pair_up_doc},
    {"short_hex_digests", native_short_hex_digests, METH_VARARGS, short_hex_digests_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    "services.ledger._native",
    "The ledger's per-transfer hashing in compiled code (see services/ledger/domain/hashing.py).",
    -1,
    methods,
    NULL,
    NULL,
    NULL,
    NULL,
};

PyMODINIT_FUNC PyInit__native(void)
{
#ifdef P2P_X86
    if (cpu_has_sha()) {
        compress = blocks_sha_ni;
        implementation = "SHA extensions";
    }
#endif
    zero_int = PyLong_FromLong(0);
    if (zero_int == NULL) {
        return NULL;
    }
    struct {
        PyObject **name;
        const char *text;
    } names[] = {
        {&s_buyer_id, "buyer_id"},         {&s_buyer_node, "buyer_node"},   {&s_seller_id, "seller_id"},
        {&s_seller_node, "seller_node"},   {&s_energy_wh, "energy_wh"},     {&s_participant_id, "participant_id"},
        {&s_bought_wh, "bought_wh"},       {&s_sold_wh, "sold_wh"},         {&s_import_wh, "import_wh"},
        {&s_export_wh, "export_wh"},       {&s_quality, "quality"},
    };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        *names[i].name = PyUnicode_InternFromString(names[i].text);
        if (*names[i].name == NULL) {
            return NULL;
        }
    }
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddStringConstant(m, "IMPLEMENTATION", implementation) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
