/*
 * _pagecheck: PostgreSQL data page checksums in C, for saveit_backup.pg.pagecheck.
 *
 * The algorithm is PostgreSQL's pg_checksum_page (src/include/storage/checksum_impl.h), written
 * here from its description: the 8 KiB page, with pd_checksum taken as zero, is read as 64 rows
 * of 32 uint32 words; lane j starts at BASE_OFFSETS[j] and takes column j through
 * tmp = sum ^ word; sum = tmp * FNV_PRIME ^ (tmp >> 17), then two more rounds with zero words;
 * the lanes are XOR-folded, XORed with the (uint32) block number and reduced to 1..65535.
 *
 * Contracts shared by both functions:
 *   - data is any C-contiguous buffer (bytes, bytearray, memoryview, ...); only its full 8 KiB
 *     pages are used, a trailing partial page is ignored; the data need not be aligned;
 *   - words are little-endian, as pagecheck.py reads them, whatever the host's byte order;
 *   - the buffer is held for the call and the loops run without the GIL, so threads check in
 *     parallel (the buffer must not be modified meanwhile: bytearray refuses resizing anyway).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define BLCKSZ 8192
#define N_SUMS 32
#define ROWS (BLCKSZ / (4 * N_SUMS))
#define WORDS (BLCKSZ / 4)
#define FNV_PRIME 16777619u

static const uint32_t base_offsets[N_SUMS] = {
    0x5B1F36E9, 0xB8525960, 0x02AB50AA, 0x1DE66D2A, 0x79FF467A, 0x9BB9F8A3, 0x217E7CD2, 0x83E13D2C,
    0xF8D4474F, 0xE39EB970, 0x42C6AE16, 0x993216FA, 0x7B093B5D, 0x98DAFF3C, 0xF718902A, 0x0B1C9CDB,
    0xE58F764B, 0x187636BC, 0x5D7B3BB1, 0xE73DE7DE, 0x92BEC979, 0xCCA6C0B2, 0x304A0979, 0x85AA43D4,
    0x783125BB, 0x6CA8EAA2, 0xE407EAC6, 0x4B5CFC3E, 0x9FBF8C76, 0x15CA20BE, 0xF2CA9FD3, 0x959BD756,
};

/* Copy page number `index` of `data` into the aligned `words`, in host order. */
static void load_page(uint32_t *words, const char *data, Py_ssize_t index)
{
    memcpy(words, data + index * BLCKSZ, BLCKSZ);
#if PY_BIG_ENDIAN
    for (int i = 0; i < WORDS; i++)
        words[i] = __builtin_bswap32(words[i]);
#endif
}

/* The XOR of the 32 lanes of a page (words in host order, pd_checksum already zeroed). */
static uint32_t page_fold(const uint32_t *words)
{
    uint32_t sums[N_SUMS], fold = 0;

    memcpy(sums, base_offsets, sizeof sums);
    for (int i = 0; i < ROWS; i++)
        for (int j = 0; j < N_SUMS; j++) {  /* independent lanes: the compiler vectorises this loop */
            uint32_t tmp = sums[j] ^ words[i * N_SUMS + j];
            sums[j] = tmp * FNV_PRIME ^ (tmp >> 17);
        }
    for (int i = 0; i < 2; i++)  /* two rounds with zero words */
        for (int j = 0; j < N_SUMS; j++) {
            uint32_t tmp = sums[j];
            sums[j] = tmp * FNV_PRIME ^ (tmp >> 17);
        }
    for (int j = 0; j < N_SUMS; j++)
        fold ^= sums[j];
    return fold;
}

/* pg_checksum_page of a loaded page; zeroes its pd_checksum (low half of word 2) on the way. */
static uint16_t page_checksum(uint32_t *words, uint64_t blkno)
{
    words[2] &= 0xFFFF0000u;
    return (uint16_t)(((page_fold(words) ^ (uint32_t)blkno) % 65535u) + 1);  /* BlockNumber is uint32 */
}

/* An int in [0, 2**64) for first_blkno / max_lsn (OverflowError or TypeError otherwise). */
static int to_u64(PyObject *obj, void *out)
{
    unsigned long long v;

    if (!PyLong_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "expected an int, got %.100s", Py_TYPE(obj)->tp_name);
        return 0;
    }
    v = PyLong_AsUnsignedLongLong(obj);
    if (v == (unsigned long long)-1 && PyErr_Occurred())
        return 0;
    *(uint64_t *)out = (uint64_t)v;
    return 1;
}

/* Hold obj's buffer (*npages full pages) and allocate *npages results of item bytes at *out (NULL for
   none). 0 with an exception set on failure, nothing then held. */
static int hold_pages(PyObject *obj, Py_buffer *view, Py_ssize_t *npages, size_t item, void **out)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_SIMPLE) < 0)
        return 0;
    *npages = view->len / BLCKSZ;
    *out = NULL;
    if (*npages > 0 && !(*out = PyMem_RawMalloc((size_t)*npages * item))) {
        PyBuffer_Release(view);
        PyErr_NoMemory();
        return 0;
    }
    return 1;
}

typedef struct {
    Py_ssize_t index;  /* page number within data */
    int expected;      /* computed checksum, 0 for a new page that is not all zero */
    int found;         /* stored pd_checksum, -1 for a new page that is not all zero */
} bad_page;

PyDoc_STRVAR(check_chunk_doc,
"check_chunk(data, first_blkno, max_lsn) -> (checked, [(block, expected, found), ...])\n\n"
"Verify the full pages of data (block first_blkno onward), as pagecheck.check_chunk: new pages\n"
"(pd_upper == 0) must be all zero, else (block, 0, -1); pages whose LSN is >= max_lsn are skipped;\n"
"the others are checked. checked counts the checked pages; bad pages come in block order.");

static PyObject *check_chunk(PyObject *self, PyObject *args)
{
    Py_buffer view;
    uint64_t first, max_lsn;
    Py_ssize_t npages, checked = 0, nbad = 0;
    bad_page *bad = NULL;
    PyObject *obj, *list = NULL, *result = NULL;

    (void)self;
    if (!PyArg_ParseTuple(args, "OO&O&:check_chunk", &obj, to_u64, &first, to_u64, &max_lsn))
        return NULL;
    if (!hold_pages(obj, &view, &npages, sizeof *bad, (void **)&bad))
        return NULL;
    if (npages > 0 && (uint64_t)(npages - 1) > UINT64_MAX - first) {  /* blocks are reported as uint64 */
        PyErr_SetString(PyExc_OverflowError, "block numbers beyond 2**64");
        goto done;
    }

    Py_BEGIN_ALLOW_THREADS
    uint32_t words[WORDS];
    for (Py_ssize_t p = 0; p < npages; p++) {
        load_page(words, view.buf, p);
        uint64_t lsn = (uint64_t)words[0] << 32 | words[1];  /* pd_lsn: xlogid, xrecoff */
        if ((words[3] >> 16) == 0) {  /* pd_upper == 0: a new page, valid only if all zero */
            uint32_t any = 0;
            for (int i = 0; i < WORDS; i++)
                any |= words[i];
            if (any)
                bad[nbad++] = (bad_page){p, 0, -1};
        } else if (lsn < max_lsn) {
            int found = (int)(words[2] & 0xFFFF);
            int expected = page_checksum(words, first + (uint64_t)p);
            checked++;
            if (expected != found)
                bad[nbad++] = (bad_page){p, expected, found};
        }
    }
    Py_END_ALLOW_THREADS

    if (!(list = PyList_New(nbad)))
        goto done;
    for (Py_ssize_t i = 0; i < nbad; i++) {
        PyObject *item = Py_BuildValue("(Kii)", (unsigned long long)(first + (uint64_t)bad[i].index),
                                       bad[i].expected, bad[i].found);
        if (!item)
            goto done;
        PyList_SET_ITEM(list, i, item);
    }
    result = Py_BuildValue("(nO)", checked, list);
done:
    Py_XDECREF(list);
    PyMem_RawFree(bad);
    PyBuffer_Release(&view);
    return result;
}

PyDoc_STRVAR(checksums_doc,
"checksums(data, first_blkno) -> list[int]\n\n"
"pg_checksum_page of every full page of data (blocks first_blkno onward), as pagecheck.checksum_pages.");

static PyObject *checksums(PyObject *self, PyObject *args)
{
    Py_buffer view;
    uint64_t first;
    Py_ssize_t npages;
    uint16_t *sums = NULL;
    PyObject *obj, *list = NULL;

    (void)self;
    if (!PyArg_ParseTuple(args, "OO&:checksums", &obj, to_u64, &first))
        return NULL;
    if (!hold_pages(obj, &view, &npages, sizeof *sums, (void **)&sums))
        return NULL;

    Py_BEGIN_ALLOW_THREADS
    uint32_t words[WORDS];
    for (Py_ssize_t p = 0; p < npages; p++) {
        load_page(words, view.buf, p);
        sums[p] = page_checksum(words, first + (uint64_t)p);
    }
    Py_END_ALLOW_THREADS

    if (!(list = PyList_New(npages)))
        goto done;
    for (Py_ssize_t p = 0; p < npages; p++) {
        PyObject *item = PyLong_FromLong(sums[p]);
        if (!item) {
            Py_CLEAR(list);
            goto done;
        }
        PyList_SET_ITEM(list, p, item);
    }
done:
    PyMem_RawFree(sums);
    PyBuffer_Release(&view);
    return list;
}

static PyMethodDef methods[] = {
    {"check_chunk", check_chunk, METH_VARARGS, check_chunk_doc},
    {"checksums", checksums, METH_VARARGS, checksums_doc},
    {NULL, NULL, 0, NULL},
};

static PyModuleDef_Slot slots[] = {  /* no module state: safe for subinterpreters and without the GIL */
#if PY_VERSION_HEX >= 0x030C0000
    {Py_mod_multiple_interpreters, Py_MOD_PER_INTERPRETER_GIL_SUPPORTED},
#endif
#if PY_VERSION_HEX >= 0x030D0000
    {Py_mod_gil, Py_MOD_GIL_NOT_USED},
#endif
    {0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_pagecheck",
    "PostgreSQL data page checksums (pg_checksum_page) in C; see saveit_backup.pg.pagecheck.",
    0, methods, slots, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__pagecheck(void)
{
    return PyModuleDef_Init(&module);
}
