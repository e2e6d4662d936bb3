/* Optional accelerator of the capture hot loop (sva.net.capture, sva.net.parse, sva.net.fastpath).
 *
 *   walk_block     one TPACKET_V3 block of the capture ring -> (ts, frame, wirelen, port) tuples
 *   parse_frame    parse.parse_frame's common case (untagged IPv4 TCP/UDP), Python for the rest
 *   process_batch  FastPath's per-frame loop: parse, count, flow-table update, deep-path choice
 *
 * Each has a Python reference that stays in use when this is not built, and
 * tests/net/test_accel.py runs both on the same hostile inputs and asserts identical results.
 * It exists because these loops are per-frame Python work of a microsecond or more each,
 * which kept the pipeline under the 250k packets per CPU-second goal of issue #5.
 *
 * Every offset and length read from the ring or from a frame is hostile: each read is
 * checked against the end of what is there before it is made, and arithmetic on 32-bit
 * fields is done in 64 bits so no sum can wrap.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define TP_STATUS_VLAN_VALID (1u << 4)
#define TP_STATUS_VLAN_TPID_VALID (1u << 6)
#define PKT_HDR_MIN 40 /* through hv1.tp_vlan_tpid */

static uint32_t rd32(const unsigned char *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static uint16_t rd16(const unsigned char *p) { uint16_t v; memcpy(&v, p, 2); return v; }

/* walk_block(buf, base, limit, first, max_frames, snap, label, out)
 *   -> (bytes, truncated, ring_errors)
 * Appends (ts, frame, wirelen, label) for each frame of the block starting at
 * base + first, following tp_next_offset, at most max_frames frames. */
static PyObject *walk_block(PyObject *self, PyObject *args) {
    Py_buffer view;
    long long base, limit, first, max_frames, snap;
    PyObject *label, *out;
    if (!PyArg_ParseTuple(args, "y*LLLLLOO!", &view, &base, &limit, &first, &max_frames, &snap, &label,
                          &PyList_Type, &out))
        return NULL;
    if (base < 0 || limit < base || limit > (long long)view.len || first < 0 || snap < 0) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "walk_block: block outside the buffer");
        return NULL;
    }
    const unsigned char *buf = (const unsigned char *)view.buf;
    long long n_bytes = 0, truncated = 0, errors = 0;
    long long off = first;
    for (long long i = 0; i < max_frames; i++) {
        long long p = base + off;
        if (p + PKT_HDR_MIN > limit) {
            errors++;
            break;
        }
        uint32_t nxt = rd32(buf + p), sec = rd32(buf + p + 4), nsec = rd32(buf + p + 8);
        uint32_t caplen = rd32(buf + p + 12), wirelen = rd32(buf + p + 16), status = rd32(buf + p + 20);
        uint16_t mac = rd16(buf + p + 24);
        long long start = p + mac;
        long long end = start + ((long long)caplen <= snap ? (long long)caplen : snap);
        if (end > limit) {
            errors++;
            break;
        }
        long long wl = wirelen, cl = caplen;
        Py_ssize_t len = (Py_ssize_t)(end - start);
        PyObject *frame;
        if (status & TP_STATUS_VLAN_VALID) {
            /* Put the tag the kernel took off back after the MAC addresses (or at the end of
             * a frame shorter than them, as the Python walk's slicing does). */
            uint16_t tci = (uint16_t)(rd32(buf + p + 32) & 0xffff), tpid = rd16(buf + p + 36);
            uint16_t tp = (status & TP_STATUS_VLAN_TPID_VALID) && tpid ? tpid : 0x8100;
            Py_ssize_t head = len < 12 ? len : 12;
            frame = PyBytes_FromStringAndSize(NULL, len + 4);
            if (frame == NULL)
                goto fail;
            char *d = PyBytes_AS_STRING(frame);
            memcpy(d, buf + start, (size_t)head);
            d[head] = (char)(tp >> 8);
            d[head + 1] = (char)(tp & 0xff);
            d[head + 2] = (char)(tci >> 8);
            d[head + 3] = (char)(tci & 0xff);
            memcpy(d + head + 4, buf + start + head, (size_t)(len - head));
            wl += 4;
            cl += 4;
        } else {
            frame = PyBytes_FromStringAndSize((const char *)buf + start, len);
            if (frame == NULL)
                goto fail;
        }
        if (cl < wl || cl > snap)
            truncated++;
        n_bytes += wl;
        PyObject *item = Py_BuildValue("(dNLO)", (double)sec + (double)nsec * 1e-9, frame, wl, label);
        if (item == NULL)
            goto fail;
        int rc = PyList_Append(out, item);
        Py_DECREF(item);
        if (rc < 0)
            goto fail;
        if (!nxt)
            break;
        off += nxt;
    }
    PyBuffer_Release(&view);
    return Py_BuildValue("(LLL)", n_bytes, truncated, errors);
fail:
    PyBuffer_Release(&view);
    return NULL;
}

/* ---- the common case of sva.net.parse.parse_frame -------------------------------------
 * parse_frame(frame, ts, wirelen, port) -> Headers: untagged IPv4 without options carrying
 * TCP or UDP, with every length consistent, is read here with the same checks as the
 * shortcut at the top of the Python parse_frame; every other frame (and any argument that
 * is not what the fast path passes) goes to the Python function, the reference. */
static PyObject *headers_type = NULL; /* sva.net.parse.Headers */
static PyObject *py_parse = NULL;     /* sva.net.parse.parse_frame */
static PyObject *empty_str = NULL, *minus_one = NULL, *eth_ip = NULL, *four = NULL, *six = NULL, *seventeen = NULL;

static PyObject *setup(PyObject *self, PyObject *args) {
    PyObject *h, *f;
    if (!PyArg_ParseTuple(args, "O!O", &PyType_Type, &h, &f))
        return NULL;
    if (!PyType_IsSubtype((PyTypeObject *)h, &PyTuple_Type) || !PyCallable_Check(f)) {
        PyErr_SetString(PyExc_TypeError, "setup(Headers tuple type, parse_frame)");
        return NULL;
    }
    Py_INCREF(h);
    Py_INCREF(f);
    Py_XSETREF(headers_type, h);
    Py_XSETREF(py_parse, f);
    Py_RETURN_NONE;
}

static PyObject *new_headers(PyObject *const *items) {
    PyTypeObject *t = (PyTypeObject *)headers_type;
    PyObject *h = t->tp_alloc(t, 19);
    if (h == NULL) {
        for (int i = 0; i < 19; i++)
            Py_DECREF(items[i]);
        return NULL;
    }
    for (int i = 0; i < 19; i++)
        PyTuple_SET_ITEM(h, i, items[i]); /* steals */
    return h;
}

static PyObject *fallback(PyObject *const *args) { return PyObject_Vectorcall(py_parse, args, 4, NULL); }

static PyObject *parse_frame(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4 || headers_type == NULL || py_parse == NULL) {
        if (py_parse == NULL) {
            PyErr_SetString(PyExc_RuntimeError, "sva.net._fastpath.setup() was not called");
            return NULL;
        }
        return PyObject_Vectorcall(py_parse, args, nargs, NULL);
    }
    PyObject *frame = args[0], *ts = args[1], *wl_obj = args[2], *port = args[3];
    if (!PyBytes_CheckExact(frame) || !PyLong_CheckExact(wl_obj))
        return fallback(args);
    const unsigned char *b = (const unsigned char *)PyBytes_AS_STRING(frame);
    Py_ssize_t n = PyBytes_GET_SIZE(frame);
    if (n < 54 || b[12] != 8 || b[13] != 0 || b[14] != 0x45)
        return fallback(args);
    int overflow = 0;
    long long wirelen = PyLong_AsLongLongAndOverflow(wl_obj, &overflow);
    if (overflow || (wirelen == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        return fallback(args);
    }
    unsigned proto = b[23];
    long long total = b[16] << 8 | b[17];
    unsigned frag = b[20] << 8 | b[21];
    long long sport = b[34] << 8 | b[35], dport = b[36] << 8 | b[37];
    long long end, pl, flags = 0;
    int fragment = 0;
    if (proto == 6) {
        end = 14 + total;
        long long doff = (b[46] >> 4) * 4;
        if (frag & 0x1FFF || total < 40 || end > n || doff < 20 || 34 + doff > end)
            return fallback(args);
        pl = 34 + doff;
        flags = b[47];
        fragment = (frag & 0x3FFF) != 0;
    } else if (proto == 17) {
        long long ulen = b[38] << 8 | b[39];
        end = 34 + ulen;
        if (frag & 0x3FFF || ulen < 8 || end > 14 + total || 14 + total > n)
            return fallback(args);
        pl = 42;
    } else {
        return fallback(args);
    }
    int widened = wirelen < n;
    PyObject *items[19];
    items[0] = Py_NewRef(ts);
    items[1] = Py_NewRef(port);
    items[2] = widened ? PyLong_FromSsize_t(n) : Py_NewRef(wl_obj);
    items[3] = PyBytes_FromStringAndSize((const char *)b + 6, 6);
    items[4] = PyBytes_FromStringAndSize((const char *)b, 6);
    items[5] = Py_NewRef(minus_one);
    items[6] = Py_NewRef(eth_ip);
    items[7] = Py_NewRef(four);
    items[8] = PyBytes_FromStringAndSize((const char *)b + 26, 4);
    items[9] = PyBytes_FromStringAndSize((const char *)b + 30, 4);
    items[10] = Py_NewRef(proto == 6 ? six : seventeen);
    items[11] = PyLong_FromLongLong(sport);
    items[12] = PyLong_FromLongLong(dport);
    items[13] = PyLong_FromLongLong(flags);
    items[14] = PyLong_FromLongLong(pl < end ? pl : -1);
    items[15] = Py_NewRef(fragment ? Py_True : Py_False);
    items[16] = Py_NewRef(empty_str);
    items[17] = Py_NewRef(frame);
    items[18] = PyLong_FromLongLong(end);
    for (int i = 0; i < 19; i++) {
        if (items[i] == NULL) {
            for (int j = 0; j < 19; j++)
                Py_XDECREF(items[j]);
            return NULL;
        }
    }
    return new_headers(items);
}

/* ---- the fast path's per-frame loop (sva.net.fastpath.FastPath._process_py) --------------
 * process_batch(batch, flows, new_flow, head_bytes, deep_on, to_deep, malformed_reasons)
 *   -> (bytes, malformed, non_ip, fragments, vlan_tagged, last ts or None)
 * Parse, count, update the flow table (an OrderedDict of sva.net.flows.Flow, least recently
 * seen first) and collect the frames the deep path wants, exactly as the Python loop does;
 * tests/net/test_accel.py runs both on the same batches and compares tables and counters.
 * The deep-path choice repeats fastpath.py's constants (ports, HTTP method prefixes). */
static PyObject *one;
static PyObject *s_last, *s_packets, *s_bytes, *s_flags_or, *s_syn, *s_synack, *s_rst, *s_fin, *s_head, *s_move_to_end;
static const char http_prefixes[][4] = {"GET ", "POST", "HEAD", "PUT ", "DELE", "OPTI", "PATC", "CONN", "TRAC"};

static long long item_ll(PyObject *h, int i) { return PyLong_AsLongLong(PyTuple_GET_ITEM(h, i)); }

/* f.<name> += delta */
static int attr_add(PyObject *f, PyObject *name, long long delta) {
    PyObject *cur = PyObject_GetAttr(f, name);
    if (cur == NULL)
        return -1;
    long long v = PyLong_AsLongLong(cur);
    Py_DECREF(cur);
    if (v == -1 && PyErr_Occurred())
        return -1;
    PyObject *nv = PyLong_FromLongLong(v + delta);
    if (nv == NULL)
        return -1;
    int rc = PyObject_SetAttr(f, name, nv);
    Py_DECREF(nv);
    return rc;
}

static int wants_deep(long long proto, long long sp, long long dp, long long pl, const unsigned char *b, Py_ssize_t n) {
    if (proto == 6) {
        if (sp == 53 || dp == 53)
            return 1;
        if (pl < 0 || pl >= n)
            return 0;
        if (dp == 443 || (b[pl] == 0x16 && pl + 1 < n && b[pl + 1] == 3))
            return 1;
        if (pl + 4 <= n)
            for (size_t i = 0; i < sizeof http_prefixes / sizeof http_prefixes[0]; i++)
                if (memcmp(b + pl, http_prefixes[i], 4) == 0)
                    return 1;
        return 0;
    }
    if (proto == 17)
        return sp == 53 || dp == 53 || sp == 67 || sp == 68 || dp == 67 || dp == 68;
    return proto == 1 || proto == 58;
}

static int account(PyObject *f, PyObject *h, PyObject *ts, int is_new, long long wl, long long head_bytes) {
    if (!is_new) {
        PyObject *last = PyObject_GetAttr(f, s_last);
        if (last == NULL)
            return -1;
        int gt = PyObject_RichCompareBool(ts, last, Py_GT);
        Py_DECREF(last);
        if (gt < 0 || (gt && PyObject_SetAttr(f, s_last, ts) < 0))
            return -1;
    }
    if (attr_add(f, s_packets, 1) < 0 || attr_add(f, s_bytes, wl) < 0)
        return -1;
    long long fl = item_ll(h, 13), pl = item_ll(h, 14), pend = item_ll(h, 18);
    if (PyErr_Occurred())
        return -1;
    if (fl) {
        PyObject *cur = PyObject_GetAttr(f, s_flags_or);
        if (cur == NULL)
            return -1;
        long long v = PyLong_AsLongLong(cur);
        Py_DECREF(cur);
        if (v == -1 && PyErr_Occurred())
            return -1;
        PyObject *nv = PyLong_FromLongLong(v | fl);
        if (nv == NULL || PyObject_SetAttr(f, s_flags_or, nv) < 0) {
            Py_XDECREF(nv);
            return -1;
        }
        Py_DECREF(nv);
        if (fl & 0x02 && attr_add(f, fl & 0x10 ? s_synack : s_syn, 1) < 0)
            return -1;
        if (fl & 0x04 && attr_add(f, s_rst, 1) < 0)
            return -1;
        if (fl & 0x01 && attr_add(f, s_fin, 1) < 0)
            return -1;
    }
    if (pl >= 0) {
        PyObject *head = PyObject_GetAttr(f, s_head);
        if (head == NULL)
            return -1;
        Py_ssize_t hl = PyObject_Length(head);
        long long room = head_bytes - hl;
        int rc = hl < 0 ? -1 : 0;
        if (rc == 0 && room > 0) {
            long long e = pend - pl <= room ? pend : pl + room;
            PyObject *piece = PySequence_GetSlice(PyTuple_GET_ITEM(h, 17), (Py_ssize_t)pl, (Py_ssize_t)e);
            PyObject *r = piece ? PySequence_InPlaceConcat(head, piece) : NULL;
            Py_XDECREF(piece);
            if (r == NULL)
                rc = -1;
            else if (r != head)
                rc = PyObject_SetAttr(f, s_head, r);
            Py_XDECREF(r);
        }
        Py_DECREF(head);
        if (rc < 0)
            return -1;
    }
    return 0;
}

static PyObject *process_batch(PyObject *self, PyObject *args) {
    PyObject *batch, *flows, *new_flow, *to_deep, *reasons;
    long long head_bytes;
    int deep_on;
    if (!PyArg_ParseTuple(args, "O!O!OLpO!O", &PyList_Type, &batch, &PyDict_Type, &flows, &new_flow, &head_bytes,
                          &deep_on, &PyList_Type, &to_deep, &reasons))
        return NULL;
    long long n_bytes = 0, malformed = 0, non_ip = 0, fragments = 0, vlan_tagged = 0;
    PyObject *last_ts = Py_None;
    Py_INCREF(last_ts);
    Py_ssize_t count = PyList_GET_SIZE(batch);
    for (Py_ssize_t i = 0; i < count && i < PyList_GET_SIZE(batch); i++) {
        PyObject *raw = PyList_GET_ITEM(batch, i);
        if (!PyTuple_Check(raw) || PyTuple_GET_SIZE(raw) != 4) {
            PyErr_SetString(PyExc_TypeError, "process_batch: a frame is not (ts, frame, wirelen, port)");
            goto fail;
        }
        PyObject *ts = PyTuple_GET_ITEM(raw, 0);
        PyObject *pargs[4] = {PyTuple_GET_ITEM(raw, 1), ts, PyTuple_GET_ITEM(raw, 2), PyTuple_GET_ITEM(raw, 3)};
        Py_SETREF(last_ts, Py_NewRef(ts));
        PyObject *h = parse_frame(NULL, pargs, 4);
        if (h == NULL)
            goto fail;
        if (!PyTuple_Check(h) || PyTuple_GET_SIZE(h) != 19) {
            Py_DECREF(h);
            PyErr_SetString(PyExc_TypeError, "process_batch: parse_frame did not give Headers");
            goto fail;
        }
        long long wl = item_ll(h, 2), vlan = item_ll(h, 5), et = item_ll(h, 6), ipv = item_ll(h, 7);
        long long proto = item_ll(h, 10), sp = item_ll(h, 11), dp = item_ll(h, 12), pl = item_ll(h, 14);
        PyObject *bad = PyTuple_GET_ITEM(h, 16);
        int is_bad = PyObject_IsTrue(bad);
        int frag = PyObject_IsTrue(PyTuple_GET_ITEM(h, 15));
        if (PyErr_Occurred() || is_bad < 0 || frag < 0) {
            Py_DECREF(h);
            goto fail;
        }
        n_bytes += wl;
        if (is_bad) {
            malformed++;
            PyObject *cur = PyObject_GetItem(reasons, bad); /* a Counter: 0 when missing */
            PyObject *nv = cur ? PyNumber_Add(cur, one) : NULL;
            Py_XDECREF(cur);
            if (nv == NULL || PyObject_SetItem(reasons, bad, nv) < 0) {
                Py_XDECREF(nv);
                Py_DECREF(h);
                goto fail;
            }
            Py_DECREF(nv);
        }
        if (vlan >= 0)
            vlan_tagged++;
        if (!ipv) {
            non_ip++;
            int rc = 0;
            if (et == 0x0806 && !is_bad)
                rc = PyList_Append(to_deep, h);
            Py_DECREF(h);
            if (rc < 0)
                goto fail;
            continue;
        }
        if (frag)
            fragments++;
        PyObject *key = PyTuple_Pack(8, PyTuple_GET_ITEM(h, 1), PyTuple_GET_ITEM(h, 3), PyTuple_GET_ITEM(h, 7),
                                     PyTuple_GET_ITEM(h, 8), PyTuple_GET_ITEM(h, 9), PyTuple_GET_ITEM(h, 10),
                                     PyTuple_GET_ITEM(h, 11), PyTuple_GET_ITEM(h, 12));
        if (key == NULL) {
            Py_DECREF(h);
            goto fail;
        }
        PyObject *f = PyDict_GetItemWithError(flows, key);
        int is_new = f == NULL;
        if (is_new) {
            if (PyErr_Occurred() || (f = PyObject_CallFunctionObjArgs(new_flow, key, h, NULL)) == NULL) {
                Py_DECREF(key);
                Py_DECREF(h);
                goto fail;
            }
        } else {
            Py_INCREF(f);
            PyObject *r = PyObject_CallMethodOneArg(flows, s_move_to_end, key);
            if (r == NULL) {
                Py_DECREF(f);
                Py_DECREF(key);
                Py_DECREF(h);
                goto fail;
            }
            Py_DECREF(r);
        }
        Py_DECREF(key);
        int rc = account(f, h, ts, is_new, wl, head_bytes);
        Py_DECREF(f);
        if (rc == 0 && deep_on) {
            PyObject *frame = PyTuple_GET_ITEM(h, 17);
            if (PyBytes_Check(frame) &&
                wants_deep(proto, sp, dp, pl, (const unsigned char *)PyBytes_AS_STRING(frame), PyBytes_GET_SIZE(frame)))
                rc = PyList_Append(to_deep, h);
        }
        Py_DECREF(h);
        if (rc < 0)
            goto fail;
    }
    return Py_BuildValue("(LLLLLN)", n_bytes, malformed, non_ip, fragments, vlan_tagged, last_ts);
fail:
    Py_DECREF(last_ts);
    return NULL;
}

static PyMethodDef methods[] = {
    {"walk_block", walk_block, METH_VARARGS, "Walk one TPACKET_V3 block (see sva.net.capture._walk_block_py)."},
    {"setup", setup, METH_VARARGS, "setup(Headers, parse_frame): the tuple type to build and the Python fallback."},
    {"parse_frame", (PyCFunction)(void (*)(void))parse_frame, METH_FASTCALL,
     "parse_frame(frame, ts, wirelen, port): sva.net.parse.parse_frame, common frames in C."},
    {"process_batch", process_batch, METH_VARARGS, "FastPath's per-frame loop (see sva.net.fastpath)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "sva.net._fastpath", "C walk of TPACKET_V3 blocks and common-frame parse.", -1, methods,
                                   NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__fastpath(void) {
    empty_str = PyUnicode_FromString("");
    minus_one = PyLong_FromLong(-1);
    eth_ip = PyLong_FromLong(0x0800);
    four = PyLong_FromLong(4);
    six = PyLong_FromLong(6);
    seventeen = PyLong_FromLong(17);
    if (!empty_str || !minus_one || !eth_ip || !four || !six || !seventeen)
        return NULL;
    if ((one = PyLong_FromLong(1)) == NULL)
        return NULL;
    PyObject **names[] = {&s_last, &s_packets, &s_bytes, &s_flags_or, &s_syn, &s_synack, &s_rst, &s_fin, &s_head, &s_move_to_end};
    const char *texts[] = {"last", "packets", "bytes", "flags_or", "syn", "synack", "rst", "fin", "head", "move_to_end"};
    for (size_t i = 0; i < sizeof texts / sizeof texts[0]; i++)
        if ((*names[i] = PyUnicode_InternFromString(texts[i])) == NULL)
            return NULL;
    return PyModule_Create(&module);
}
