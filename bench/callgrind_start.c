/* Built by bench/instructions.py and loaded by bench/callgrind_app.py: lets the relay's worker,
 * started with callgrind's instrumentation off, turn it on once the relay is up. */
#include <valgrind/callgrind.h>

void bench_start_instrumentation(void) { CALLGRIND_START_INSTRUMENTATION; }
