"""Connected pieces of a label image: equal-value components, one-piece enforcement, deterministic ids.

All functions take NumPy or CuPy arrays; backend primitives come from `ops_for` (the equal-value
labelling itself is `ops.label_by_value`: a compiled union-find with scikit-image's numbering on the CPU,
`array_algorithms.label_by_value_propagation` on the GPU).
"""
from __future__ import annotations

import numpy as np

from gpu_pipeline._backend import get_array_module, ops_for
from gpu_pipeline.array_algorithms import neighbour_slices


def component_table(mask, out=None):
    """``(labels, count, sizes)`` of ``mask``'s face-connected components (sizes per label 0..count).
    ``out``: a buffer for the labels (an int32 array of the mask's shape; used on the CPU), or None."""
    return ops_for(mask).label_table(mask, out=out)


def relabel_by_first_voxel(labels):
    """Renumber labels 1..n in the C order of each label's first voxel; 0 stays 0.

    This is the project's one deterministic numbering: the same partition gives
    the same bytes whatever produced it (backend, chunking, worker count).
    """
    xp = get_array_module(labels)
    ops = ops_for(labels)
    flat = labels.ravel()
    nonzero = xp.flatnonzero(flat)
    if nonzero.size == 0:
        return xp.zeros(labels.shape, dtype=xp.int32)
    values = flat[nonzero].astype(xp.int64)
    top = int(values.max())
    first = xp.full(top + 1, labels.size, dtype=xp.int64)
    ops.scatter_min(first, values, nonzero.astype(xp.int64))
    present = xp.flatnonzero(first < labels.size)
    order = xp.argsort(first[present], kind="stable")
    mapping = xp.zeros(top + 1, dtype=xp.int32 if present.size < 2**31 - 1 else xp.int64)
    mapping[present[order]] = xp.arange(1, present.size + 1, dtype=mapping.dtype)
    return mapping[labels]


def piece_stats(pieces, labels, *, return_first=False):
    """Label and size of every piece (index = piece id; 0 = background); with ``return_first``, also the
    flat index (C order) of each piece's first voxel (``pieces.size`` for an id that is absent)."""
    xp = get_array_module(pieces)
    if xp.__name__ == "numpy":  # one compiled pass instead of a scatter of every voxel and a bincount
        from cpu_fallback.kernels import piece_stats as compiled

        piece_label, piece_size, first = compiled(pieces, labels)
    else:
        flat = pieces.ravel()
        n_pieces = int(flat.max()) if flat.size else 0
        piece_label = xp.zeros(n_pieces + 1, dtype=xp.int64)
        piece_label[flat] = labels.ravel()
        piece_size = xp.bincount(flat, minlength=n_pieces + 1).astype(xp.int64)
        if return_first:
            first = xp.full(n_pieces + 1, flat.size, dtype=xp.int64)
            ops_for(pieces).scatter_min(first, flat, xp.arange(flat.size, dtype=xp.int64))
    return (piece_label, piece_size, first) if return_first else (piece_label, piece_size)


def stray_pieces(piece_label, piece_size):
    """Pieces that are not their label's main piece (largest, ties to the smaller piece id); None if none."""
    xp = get_array_module(piece_label)
    ops = ops_for(piece_label)
    n_pieces = piece_label.size - 1
    if n_pieces == int(xp.unique(piece_label[1:]).size):
        return None
    key = piece_size * (n_pieces + 1) + (n_pieces - xp.arange(n_pieces + 1))
    best = xp.full(int(piece_label.max()) + 1, -1, dtype=xp.int64)
    ops.scatter_max(best, piece_label[1:], key[1:])
    stray = key != best[piece_label]
    stray[0] = False
    return stray


def face_pairs_between_labels(pieces, labels, near=None, axes=None, other=None):
    """(piece, neighbouring label, number of shared faces) for faces between voxels of different labels.

    ``pieces`` and ``labels`` are voxel arrays of the same shape; ``near``
    (bool per voxel) restricts the count to faces with a voxel in it;
    ``axes`` to faces along those axes (default all); ``other`` (default
    ``labels``): what is reported of the neighbouring voxel (``pieces``:
    which piece touches which). Returned as unique pairs with counts,
    ready to be summed with other blocks'.
    """
    xp = get_array_module(pieces)
    if xp.__name__ == "numpy" and near is None and axes is None:  # every face: one compiled pass per axis
        from cpu_fallback.kernels import face_sides

        return count_pairs(*face_sides(pieces, labels, other))
    other = labels if other is None else other
    a_list, b_list = [], []
    for axis in range(pieces.ndim) if axes is None else axes:
        lo, hi = neighbour_slices(pieces.ndim, axis)
        pa, pb, la, lb, oa, ob = pieces[lo], pieces[hi], labels[lo], labels[hi], other[lo], other[hi]
        if near is not None:
            keep = near[lo] | near[hi]
            pa, pb, la, lb, oa, ob = pa[keep], pb[keep], la[keep], lb[keep], oa[keep], ob[keep]
        touch = (pa != 0) & (pb != 0) & (la != lb)
        a_list += [pa[touch], pb[touch]]
        b_list += [ob[touch], oa[touch]]
    return count_pairs(xp.concatenate([a.ravel() for a in a_list]).astype(xp.int64),
                       xp.concatenate([b.ravel() for b in b_list]).astype(xp.int64))


def count_pairs(a, b, counts=None):
    """Unique (a, b) pairs and their summed counts (default 1 per occurrence), sorted by (a, b)."""
    xp = get_array_module(a)
    if a.size == 0:
        return a.astype(xp.int64), b.astype(xp.int64), xp.zeros(0, dtype=xp.int64)
    counts = xp.ones(a.size, dtype=xp.int64) if counts is None else counts.astype(xp.int64)
    low_a, low_b = int(a.min()), int(b.min())
    span_a, span_b = int(a.max()) - low_a + 1, int(b.max()) - low_b + 1
    if span_a * span_b < 2**62:  # one int64 key in (a, b) order: one sort instead of a two-key lexsort
        order = xp.argsort((a.astype(xp.int64) - low_a) * span_b + (b.astype(xp.int64) - low_b))
    else:
        order = xp.lexsort(xp.stack([b, a]))
    a, b, counts = a[order], b[order], counts[order]
    start = xp.concatenate([xp.ones(1, dtype=bool), (a[1:] != a[:-1]) | (b[1:] != b[:-1])])
    index = xp.cumsum(start) - 1
    # Face counts stay far below 2**53, so float64 weights add them exactly.
    summed = xp.rint(xp.bincount(index, weights=counts.astype(xp.float64))).astype(xp.int64)
    return a[start], b[start], summed


def reassign_strays(piece_label, stray, pair_piece, pair_label, pair_count):
    """New label per piece: each stray piece joins the label it shares most faces with (ties: smaller label).

    Stray pieces touching no other label get new ids of their own (after the
    current largest label, in piece order).
    """
    xp = get_array_module(piece_label)
    ops = ops_for(piece_label)
    n_pieces = piece_label.size - 1
    keep = stray[pair_piece]
    pa, pl, counts = pair_piece[keep], pair_label[keep], pair_count[keep]
    new_label = piece_label.copy()
    if pa.size:
        n_labels = int(piece_label.max()) + 1
        score = counts * n_labels + (n_labels - 1 - pl)
        top = xp.full(n_pieces + 1, -1, dtype=xp.int64)
        ops.scatter_max(top, pa, score)
        chosen = score == top[pa]
        new_label[pa[chosen]] = pl[chosen]
    isolated = stray & (new_label == piece_label)
    if bool(isolated.any()):
        ids = xp.flatnonzero(isolated)
        new_label[ids] = int(piece_label.max()) + 1 + xp.arange(ids.size)
    return new_label


def merge_touching_pieces(new_label, piece_size, piece_pairs):
    """Pieces given ``new_label``, merged where two touching pieces now carry the same label.

    ``piece_pairs``: (piece, touching piece, shared faces), both directions,
    for pieces 1..n numbered by first voxel (host NumPy arrays). Two voxels
    of equal label are face-connected exactly when their pieces are joined
    by a chain of touching pieces of that label, so the merged pieces are the
    connected components of that small graph: the voxels' equal-value
    components without another pass over them. Returns ``(remap, label,
    size, pairs)``: old piece -> merged piece (numbered by smallest member,
    which keeps first-voxel order), and the merged pieces' label, size and
    pairs.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    p, q, faces = piece_pairs
    n = new_label.size
    same = new_label[p] == new_label[q]
    graph = coo_matrix((np.ones(int(same.sum()), dtype=np.int8), (p[same], q[same])), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    smallest = np.full(int(component.max()) + 1, n, dtype=np.int64)
    np.minimum.at(smallest, component, np.arange(n, dtype=np.int64))
    rank = np.empty(smallest.size, dtype=np.int64)
    rank[np.argsort(smallest, kind="stable")] = np.arange(smallest.size)  # piece 0 (background) stays 0
    remap = rank[component]
    label = np.zeros(smallest.size, dtype=new_label.dtype)
    label[remap] = new_label
    size = np.rint(np.bincount(remap, weights=piece_size.astype(np.float64), minlength=smallest.size))
    a, b = remap[p], remap[q]
    apart = a != b
    return remap, label, size.astype(np.int64), count_pairs(a[apart], b[apart], faces[apart])


def settle_pieces(piece_label, piece_size, piece_pairs, max_rounds=10):
    """:func:`one_piece_rounds` on the graph of pieces: one labelling of the voxels, every round on tables.

    ``piece_label``, ``piece_size``: per piece 1..n (numbered by first voxel)
    its label and voxel count; ``piece_pairs``: (piece, touching piece,
    shared faces) over faces between different labels, both directions
    (``face_pairs_between_labels(pieces, labels, other=pieces)``). Each round
    decides the stray pieces and the labels they join exactly as the voxel
    rounds do (:func:`stray_pieces`, :func:`reassign_strays`), then merges
    the pieces that now touch with equal labels (:func:`merge_touching_pieces`).

    Returns ``(table, label, rounds)``: the final piece of every input piece
    (ids 1..m by first voxel, as the voxel rounds' last labelling numbers
    them), each final piece's label (its own id where ``max_rounds`` left
    strays), and the rounds run (the voxel rounds' count of labellings).
    """
    table = np.arange(piece_label.size, dtype=np.int64)
    for round_ in range(max_rounds):
        stray = stray_pieces(piece_label, piece_size)
        if stray is None:
            return table, piece_label, round_ + 1
        p, q, faces = piece_pairs
        new_label = reassign_strays(piece_label, stray, *count_pairs(p, piece_label[q], faces))
        remap, piece_label, piece_size, piece_pairs = merge_touching_pieces(new_label, piece_size, piece_pairs)
        table = remap[table]
    # As the voxel rounds: pieces still stray after the last round keep ids of their own.
    return table, np.arange(piece_label.size, dtype=np.int64), max_rounds


def enforce_one_piece(labels, max_rounds=10):
    """Make every label one face-connected piece.

    A label's largest piece keeps the label; every other piece joins the
    neighbouring label it shares most faces with (ties: the smaller label).
    Pieces that touch nothing else keep a new id of their own. Repeats until
    no label has two pieces (a piece may border only other stray pieces);
    after ``max_rounds`` any piece still stray gets an id of its own, so the
    result always has one piece per label. The chunked pipeline runs the
    same rounds with these functions on per-chunk partial counts.
    """
    return one_piece_rounds(labels, max_rounds)[0]


def one_piece_rounds(labels, max_rounds=10, pieces_only=False):
    """:func:`enforce_one_piece`'s result and its pieces: ``(labels, pieces)``.

    ``pieces`` labels the same partition (one piece per label) with ids
    1..n in the C order of each piece's first voxel, i.e. it equals
    ``relabel_by_first_voxel(labels)`` without another pass over the volume.
    The voxels are labelled once; where some label has several pieces, the
    rounds run on the graph of touching pieces (:func:`settle_pieces`, on
    the host: tables of pieces, not voxels) and the result is two gathers,
    one with ``pieces_only`` (``(None, pieces)``: the pieces are all that
    :func:`~gpu_pipeline.stages.split.finish_labels` keeps).
    """
    from gpu_pipeline._backend import to_host

    xp = get_array_module(labels)
    pieces = ops_for(labels).label_by_value(labels)
    piece_label, piece_size = piece_stats(pieces, labels)
    if stray_pieces(piece_label, piece_size) is None:
        return labels, pieces
    pairs = face_pairs_between_labels(pieces, labels, other=pieces)
    table, label, _ = settle_pieces(to_host(piece_label), to_host(piece_size), tuple(to_host(a) for a in pairs),
                                    max_rounds)
    final = xp.asarray(table.astype(pieces.dtype, copy=False))[pieces]
    if pieces_only:
        return None, final
    return xp.asarray(label.astype(labels.dtype, copy=False))[final], final
