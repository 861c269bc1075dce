"""Each run records the machine and warns when other processes competed for its CPUs."""
from fastgen.machine import Machine


def test_a_run_that_waited_for_the_cpu_is_flagged_as_noise():
    machine = Machine.at_start()
    total = sum(i * i for i in range(200_000))           # some work of this process's own
    machine.finish(threads=1)
    assert total > 0 and machine.cpu_model and machine.cpus >= 1 and len(machine.load_average_end) == 3
    assert machine.cpu_wait_frac is not None and 0 <= machine.cpu_wait_frac <= 1
    assert set(machine.asdict()) >= {"cpu_flags", "threads", "load_average_start", "cpu_wait_frac", "noise_warning"}
    quiet = Machine("cpu", "", 2, threads=2, load_average_start=[6.0] * 3, load_average_end=[6.0] * 3,
                    cpu_wait_frac=0.02)
    assert quiet.noise_warning() is None                  # what the run's own threads saw decides
    busy = Machine("cpu", "", 2, threads=2, load_average_start=[0.5] * 3, load_average_end=[2.0] * 3,
                   cpu_wait_frac=0.4)
    assert "waited for a CPU 40%" in busy.noise_warning() and "timer=cpu hardware.threads=1" in busy.noise_warning()
    # without the OS's per-thread wait times: the load average at the end beyond this run's own threads
    assert Machine("cpu", "", 2, threads=2, load_average_end=[2.4] * 3).noise_warning() is None
    assert "~2.5 CPUs busy" in Machine("cpu", "", 2, threads=2, load_average_end=[4.5] * 3).noise_warning()
    assert Machine("cpu", "", 2, threads=None, load_average_end=[9.0] * 3).noise_warning() is None   # virtual clock
