"""Cython + OpenMP kernels (backend "cython")."""

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    #define FASTBN_OPENMP 1
    #else
    #define FASTBN_OPENMP 0
    static int omp_get_max_threads(void) { return 1; }
    static int omp_get_thread_num(void) { return 0; }
    #endif
    """
    bint FASTBN_OPENMP
    int omp_get_max_threads() noexcept nogil
    int omp_get_thread_num() noexcept nogil

OPENMP_ENABLED = bool(FASTBN_OPENMP)


def openmp_max_threads():
    """OpenMP's current thread limit (follows OMP_NUM_THREADS and threadpoolctl); 1 without OpenMP."""
    return omp_get_max_threads()
